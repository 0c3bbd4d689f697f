# Per cluster: a network path from the hub to its private API server, and the data that
# renders its relay.yaml entry (server = private FQDN, connect = endpoint IP, CA).
#
# STOP/START CAVEAT (private_endpoint clusters): `az aks stop` + `az aks start` recreates the
# cluster's Private Link service. The hub's private endpoint then stays "Disconnected" and the
# relay gets connect timeouts / resets for that cluster (502/504 naming it). Fix:
#   terraform apply -replace='azurerm_private_endpoint.cluster["<name>"]'
# (the DNS record and the rendered `connect` follow the new IP). It is made detectable three
# ways: the activity-log alert below fires on every start of such a cluster; the output
# `private_endpoint_checks` prints the command that shows the connection state; and
# `kube-relay doctor` / the Prometheus rule KubeRelayUpstreamUnreachable see the failure.

locals {
  pe_clusters          = { for k, c in var.clusters : k => c if c.connectivity == "private_endpoint" }
  peered_clusters      = { for k, c in var.clusters : k => c if c.connectivity == "peering" }
  impersonate_clusters = { for k, c in var.clusters : k => c if c.upstream_auth == "impersonate" }

  private_fqdn = { for k, c in var.clusters : k => data.azurerm_kubernetes_cluster.cluster[k].private_fqdn }
  # <record>.<zone>: the system zone is <guid>.privatelink.<region>.azmk8s.io.
  pe_record = { for k, c in local.pe_clusters : k => split(".", local.private_fqdn[k])[0] }
  pe_zone = {
    for k, c in local.pe_clusters :
    k => join(".", slice(split(".", local.private_fqdn[k]), 1, length(split(".", local.private_fqdn[k]))))
  }
}

data "azurerm_kubernetes_cluster" "cluster" {
  for_each            = var.clusters
  name                = each.value.aks_name
  resource_group_name = each.value.aks_resource_group
}

# --- option B: a private endpoint in the hub (sub-resource "management") ---

resource "azurerm_private_endpoint" "cluster" {
  for_each            = local.pe_clusters
  name                = "pe-${var.name}-${each.key}"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  subnet_id           = azurerm_subnet.endpoints.id
  tags                = merge(var.tags, { "kube-relay/cluster" = each.key })

  private_service_connection {
    name                           = "aks-${each.key}"
    private_connection_resource_id = data.azurerm_kubernetes_cluster.cluster[each.key].id
    subresource_names              = ["management"]
    is_manual_connection           = false
  }
}

# A hub copy of each cluster's private zone, for humans and tools in the hub; the relay itself
# dials the endpoint IP (`connect`) and needs no DNS for these clusters.
resource "azurerm_private_dns_zone" "cluster" {
  for_each            = toset(values(local.pe_zone))
  name                = each.value
  resource_group_name = azurerm_resource_group.hub.name
  tags                = var.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "cluster" {
  for_each              = azurerm_private_dns_zone.cluster
  name                  = "hub"
  resource_group_name   = azurerm_resource_group.hub.name
  private_dns_zone_name = each.value.name
  virtual_network_id    = azurerm_virtual_network.hub.id
  tags                  = var.tags
}

resource "azurerm_private_dns_a_record" "cluster" {
  for_each            = local.pe_clusters
  name                = local.pe_record[each.key]
  zone_name           = azurerm_private_dns_zone.cluster[local.pe_zone[each.key]].name
  resource_group_name = azurerm_resource_group.hub.name
  ttl                 = 300
  records             = [azurerm_private_endpoint.cluster[each.key].private_service_connection[0].private_ip_address]
  tags                = var.tags
}

# --- option A: VNet peering plus a link from the cluster's own private zone ---
# Both sides in this subscription; for a spoke elsewhere, create the spoke->hub peering there.

resource "azurerm_virtual_network_peering" "hub_to_cluster" {
  for_each                  = local.peered_clusters
  name                      = "hub-to-${each.key}"
  resource_group_name       = azurerm_resource_group.hub.name
  virtual_network_name      = azurerm_virtual_network.hub.name
  remote_virtual_network_id = each.value.vnet_id
  allow_forwarded_traffic   = false
}

resource "azurerm_virtual_network_peering" "cluster_to_hub" {
  for_each                  = local.peered_clusters
  name                      = "${each.key}-to-hub-${var.name}"
  resource_group_name       = split("/", each.value.vnet_id)[4]
  virtual_network_name      = split("/", each.value.vnet_id)[8]
  remote_virtual_network_id = azurerm_virtual_network.hub.id
  allow_forwarded_traffic   = false
}

resource "azurerm_private_dns_zone_virtual_network_link" "cluster_zone_to_hub" {
  for_each              = local.peered_clusters
  name                  = "${var.name}-hub"
  resource_group_name   = split("/", each.value.private_dns_zone_id)[4]
  private_dns_zone_name = split("/", each.value.private_dns_zone_id)[8]
  virtual_network_id    = azurerm_virtual_network.hub.id
  tags                  = var.tags
}

# --- detect the stop/start caveat ---

resource "azurerm_monitor_action_group" "relay" {
  count               = var.alert_email != "" ? 1 : 0
  name                = "ag-${var.name}-relay"
  resource_group_name = azurerm_resource_group.hub.name
  short_name          = "kuberelay"
  tags                = var.tags

  email_receiver {
    name          = "platform"
    email_address = var.alert_email
  }
}

resource "azurerm_monitor_activity_log_alert" "cluster_started" {
  for_each            = local.pe_clusters
  name                = "alert-${var.name}-${each.key}-started"
  resource_group_name = azurerm_resource_group.hub.name
  location            = "global"
  scopes              = [data.azurerm_kubernetes_cluster.cluster[each.key].id]
  description         = "Cluster ${each.key} was started: its Private Link service is new, so recreate the hub private endpoint: terraform apply -replace='azurerm_private_endpoint.cluster[\"${each.key}\"]'"
  tags                = var.tags

  criteria {
    category       = "Administrative"
    operation_name = "Microsoft.ContainerService/managedClusters/start/action"
  }

  dynamic "action" {
    for_each = azurerm_monitor_action_group.relay
    content {
      action_group_id = action.value.id
    }
  }
}
