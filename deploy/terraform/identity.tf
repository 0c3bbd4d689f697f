# The relay's one Azure identity, with exactly the roles each credential mode needs:
#   - always: read its serving certificate's secret in Key Vault (Key Vault Secrets User, scoped
#     to that one secret, not the vault);
#   - upstream_auth = impersonate: the four impersonation data actions, scoped to each such
#     cluster (AKS with Azure RBAC; with Kubernetes RBAC bind a ClusterRole instead, see
#     docs/deploy-hub.md). Getting an AKS-audience token from IMDS needs no Azure role;
#   - upstream_auth = passthrough: nothing (callers bring their own AKS tokens);
#   - upstream_auth = on_behalf_of: nothing in Azure RBAC; the identity is a federated
#     credential of the relay's app registration (output obo_federated_credential).

resource "azurerm_user_assigned_identity" "relay" {
  name                = "id-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  tags                = var.tags
}

resource "azurerm_role_definition" "impersonate" {
  count       = length(local.impersonate_clusters) > 0 ? 1 : 0
  name        = "${var.name} kube-relay impersonator"
  scope       = "/subscriptions/${var.subscription_id}"
  description = "Impersonate users, groups, service accounts and user extras (oid) on AKS clusters with Azure RBAC; nothing else."

  permissions {
    actions = []
    data_actions = [
      "Microsoft.ContainerService/managedClusters/users/impersonate/action",
      "Microsoft.ContainerService/managedClusters/groups/impersonate/action",
      "Microsoft.ContainerService/managedClusters/serviceaccounts/impersonate/action",
      "Microsoft.ContainerService/managedClusters/authentication.k8s.io/userextras/impersonate/action",
    ]
  }

  assignable_scopes = [for k, c in local.impersonate_clusters : data.azurerm_kubernetes_cluster.cluster[k].id]
}

resource "azurerm_role_assignment" "impersonate" {
  for_each           = local.impersonate_clusters
  scope              = data.azurerm_kubernetes_cluster.cluster[each.key].id
  role_definition_id = azurerm_role_definition.impersonate[0].role_definition_resource_id
  principal_id       = azurerm_user_assigned_identity.relay.principal_id
  principal_type     = "ServicePrincipal"
}
