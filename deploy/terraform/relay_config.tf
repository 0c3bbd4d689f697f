# kube-relay's configuration, rendered from this deployment (the configuration reference in
# README.md). The same document is installed on every instance and exported as the output `relay_config_yaml`.

locals {
  # systemd's LoadCredential= copies the Key Vault PEM (chain + key in one file) here; the relay
  # reads the chain from it as cert_file and the key from it as key_file.
  serving_pem = "/run/credentials/kube-relay.service/relay.pem"

  # One object per mode, looked up by name: a conditional between objects of different shapes
  # would not type-check.
  upstream_auth_by_mode = {
    passthrough = { mode = "passthrough" }
    impersonate = {
      mode  = "impersonate"
      azure = { credential = "managed_identity", client_id = azurerm_user_assigned_identity.relay.client_id }
    }
    on_behalf_of = {
      mode      = "on_behalf_of"
      client_id = var.obo_app_client_id
      tenant_id = var.tenant_id
      federated = { credential = "managed_identity", client_id = azurerm_user_assigned_identity.relay.client_id }
    }
  }

  # `connect` for private-endpoint clusters only.
  cluster_connect = {
    for k, c in local.pe_clusters :
    k => "${azurerm_private_endpoint.cluster[k].private_service_connection[0].private_ip_address}:443"
  }

  relay_config = {
    listen     = "0.0.0.0:8443"
    public_url = "https://${var.public_host}"
    tls        = { cert_file = local.serving_pem, key_file = local.serving_pem }
    # Reachable by the load balancer probe and monitoring only (NSG rules in network.tf).
    admin   = { listen = "0.0.0.0:9090" }
    routing = { host_suffix = var.host_suffix, path_prefix = "/clusters" }
    identity = {
      issuers = concat(
        [{ name = "entra", kind = "entra", tenant_id = var.tenant_id, audiences = var.relay_audiences }],
        [for i in var.extra_issuers : { for k, v in i : k => v if v != null }],
      )
    }
    clusters = [
      for k, c in var.clusters : merge(
        {
          name          = k
          server        = "https://${local.private_fqdn[k]}:443"
          ca_file       = "clusters/${k}-ca.crt"
          upstream_auth = local.upstream_auth_by_mode[c.upstream_auth]
          # Unset keys are left out: the relay rejects nulls where it expects lists.
          access = [for r in c.access : { for rk, rv in r : rk => rv if rv != null }]
        },
        # {connect = ...} or {}, without a conditional between objects of different shapes.
        { for ck, addr in local.cluster_connect : "connect" => addr if ck == k },
      )
    ]
  }

  relay_config_yaml = yamlencode(local.relay_config)

  # Cluster CAs from each cluster's kubeconfig (certificate-authority-data). Public material.
  cluster_ca_pem = {
    for k, c in var.clusters : k => base64decode(nonsensitive(data.azurerm_kubernetes_cluster.cluster[k].kube_config[0].cluster_ca_certificate))
  }
}
