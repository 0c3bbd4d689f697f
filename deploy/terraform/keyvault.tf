# The serving certificate lives in Key Vault; each instance's Key Vault VM extension keeps a PEM
# copy (certificate chain + key) on disk and picks up renewals. Issuance options: certs/README.md.

resource "azurerm_key_vault" "relay" {
  # Vault names are global and at most 24 characters.
  name                       = "kv-${var.name}-${substr(md5(azurerm_resource_group.hub.id), 0, 6)}"
  location                   = azurerm_resource_group.hub.location
  resource_group_name        = azurerm_resource_group.hub.name
  tenant_id                  = data.azurerm_client_config.current.tenant_id
  sku_name                   = "standard"
  rbac_authorization_enabled = true
  purge_protection_enabled   = true
  soft_delete_retention_days = 90
  # checkov:skip=CKV_AZURE_189: the deployer reaches the vault through its firewall (deployer_ip_ranges); instances use the private endpoint
  public_network_access_enabled = true
  tags                          = var.tags

  network_acls {
    default_action = "Deny"
    bypass         = "AzureServices"
    ip_rules       = var.deployer_ip_ranges
  }
}

# Whoever runs terraform creates and renews the certificate object.
resource "azurerm_role_assignment" "deployer_certificates" {
  scope                = azurerm_key_vault.relay.id
  role_definition_name = "Key Vault Certificates Officer"
  principal_id         = data.azurerm_client_config.current.object_id
}

resource "azurerm_key_vault_certificate" "serving" {
  name         = "kube-relay-serving"
  key_vault_id = azurerm_key_vault.relay.id
  depends_on   = [azurerm_role_assignment.deployer_certificates]

  certificate_policy {
    issuer_parameters {
      name = var.serving_certificate_issuer
    }
    key_properties {
      # The VM extension needs the private key.
      exportable = true
      key_type   = "RSA"
      key_size   = 2048
      reuse_key  = false
    }
    lifetime_action {
      action {
        action_type = "AutoRenew"
      }
      trigger {
        days_before_expiry = 30
      }
    }
    secret_properties {
      # PEM, so the extension writes a file the relay reads as both cert_file and key_file.
      content_type = "application/x-pem-file"
    }
    x509_certificate_properties {
      subject            = "CN=${var.public_host}"
      validity_in_months = 12
      key_usage          = ["digitalSignature", "keyEncipherment"]
      extended_key_usage = ["1.3.6.1.5.5.7.3.1"]
      subject_alternative_names {
        dns_names = distinct([var.public_host, var.host_suffix, "*.${var.host_suffix}"])
      }
    }
  }
}

# Least privilege: the relay reads only this certificate's secret.
resource "azurerm_role_assignment" "relay_reads_certificate" {
  scope                = "${azurerm_key_vault.relay.id}/secrets/${azurerm_key_vault_certificate.serving.name}"
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.relay.principal_id
  principal_type       = "ServicePrincipal"
}

resource "azurerm_private_dns_zone" "vault" {
  name                = "privatelink.vaultcore.azure.net"
  resource_group_name = azurerm_resource_group.hub.name
  tags                = var.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "vault" {
  name                  = "hub"
  resource_group_name   = azurerm_resource_group.hub.name
  private_dns_zone_name = azurerm_private_dns_zone.vault.name
  virtual_network_id    = azurerm_virtual_network.hub.id
  tags                  = var.tags
}

resource "azurerm_private_endpoint" "vault" {
  name                = "pe-${var.name}-vault"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  subnet_id           = azurerm_subnet.endpoints.id
  tags                = var.tags

  private_service_connection {
    name                           = "vault"
    private_connection_resource_id = azurerm_key_vault.relay.id
    subresource_names              = ["vault"]
    is_manual_connection           = false
  }

  private_dns_zone_group {
    name                 = "vault"
    private_dns_zone_ids = [azurerm_private_dns_zone.vault.id]
  }
}
