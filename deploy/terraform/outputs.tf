output "relay_address" {
  description = "Where clients connect (port 443). Point DNS for public_host and *.host_suffix here."
  value       = var.load_balancer_type == "public" ? one(azurerm_public_ip.relay[*].ip_address) : var.internal_lb_ip
}

output "relay_config_yaml" {
  description = "kube-relay's relay.yaml as installed on every instance (server = private FQDN, connect = private endpoint IP, ca_file per cluster). Check it with `kube-relay check-config` and `kube-relay doctor`."
  value       = local.relay_config_yaml
}

output "cluster_ca_pem" {
  description = "Each cluster's CA (write to clusters/<name>-ca.crt beside relay.yaml when running the relay elsewhere, e.g. on the hub AKS variant)."
  value       = local.cluster_ca_pem
}

output "clusters" {
  description = "Per cluster: server, connect and the network path used."
  value = {
    for k, c in var.clusters : k => {
      server       = "https://${local.private_fqdn[k]}:443"
      connect      = lookup(local.cluster_connect, k, null)
      connectivity = c.connectivity
      mode         = c.upstream_auth
    }
  }
}

output "private_endpoint_checks" {
  description = "Commands that show whether each cluster's private endpoint is still connected (after a cluster stop/start it is not: recreate it with terraform apply -replace)."
  value = {
    for k, c in local.pe_clusters : k => "az network private-endpoint show -g ${azurerm_resource_group.hub.name} -n ${azurerm_private_endpoint.cluster[k].name} --query 'privateLinkServiceConnections[0].privateLinkServiceConnectionState.status' -o tsv  # expect Approved"
  }
}

output "relay_identity" {
  description = "The relay's managed identity: client id (relay.yaml), principal id (role assignments, Kubernetes RBAC subjects)."
  value = {
    client_id    = azurerm_user_assigned_identity.relay.client_id
    principal_id = azurerm_user_assigned_identity.relay.principal_id
  }
}

output "obo_federated_credential" {
  description = "For clusters in on_behalf_of mode: add this federated identity credential to the relay's app registration (obo_app_client_id)."
  value = {
    issuer   = "https://login.microsoftonline.com/${var.tenant_id}/v2.0"
    subject  = azurerm_user_assigned_identity.relay.principal_id
    audience = "api://AzureADTokenExchange"
  }
}

output "key_vault" {
  description = "The vault holding the serving certificate."
  value = {
    name           = azurerm_key_vault.relay.name
    certificate_id = azurerm_key_vault_certificate.serving.versionless_id
  }
}
