# Reference runtime: a zone-spread Linux VM scale set running kube-relay under systemd
# (deploy/systemd/kube-relay.service). The alternative, a small hub AKS cluster running
# deploy/kubernetes, is described in docs/deploy-hub.md.

resource "azurerm_linux_virtual_machine_scale_set" "relay" {
  name                = "vmss-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  sku                 = var.relay_vm_size
  instances           = var.relay_instances
  zones               = var.zones
  zone_balance        = length(var.zones) > 1
  admin_username      = "relayadmin"
  # No passwords, ever; SSH keys for break-glass only (no public IPs, NSG denies 22).
  disable_password_authentication = true
  encryption_at_host_enabled      = true
  secure_boot_enabled             = true
  vtpm_enabled                    = true
  extension_operations_enabled    = true
  provision_vm_agent              = true
  health_probe_id                 = azurerm_lb_probe.ready.id
  # A new model (new config, new binary, a cluster added) rolls out one instance at a time,
  # each drained by the load balancer probe first: upgrades without downtime.
  upgrade_mode = "Rolling"
  tags         = var.tags

  rolling_upgrade_policy {
    max_batch_instance_percent              = 50
    max_unhealthy_instance_percent          = 50
    max_unhealthy_upgraded_instance_percent = 0
    pause_time_between_batches              = "PT1M"
  }

  automatic_instance_repair {
    enabled      = true
    grace_period = "PT10M"
  }

  admin_ssh_key {
    username   = "relayadmin"
    public_key = var.admin_ssh_public_key
  }

  source_image_reference {
    publisher = "Canonical"
    offer     = "ubuntu-24_04-lts"
    sku       = "server"
    version   = "latest"
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "Premium_LRS"
  }

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.relay.id]
  }

  network_interface {
    name                          = "relay"
    primary                       = true
    enable_accelerated_networking = true

    ip_configuration {
      name                                   = "relay"
      primary                                = true
      subnet_id                              = azurerm_subnet.relay.id
      load_balancer_backend_address_pool_ids = [azurerm_lb_backend_address_pool.relay.id]
    }
  }

  custom_data = base64encode(templatefile("${path.module}/cloud-init.yaml.tftpl", {
    relay_config_yaml   = local.relay_config_yaml
    cluster_ca_pem      = local.cluster_ca_pem
    systemd_unit        = file("${path.module}/../systemd/kube-relay.service")
    relay_binary_url    = var.relay_binary_url
    relay_binary_sha256 = var.relay_binary_sha256
    vault_name          = azurerm_key_vault.relay.name
    certificate_name    = azurerm_key_vault_certificate.serving.name
  }))

  # Keeps the serving certificate on disk and current (renewals included).
  extension {
    name                       = "KeyVaultForLinux"
    publisher                  = "Microsoft.Azure.KeyVault"
    type                       = "KeyVaultForLinux"
    type_handler_version       = "3.0"
    auto_upgrade_minor_version = true
    settings = jsonencode({
      secretsManagementSettings = {
        pollingIntervalInS   = "3600"
        requireInitialSync   = true
        observedCertificates = [azurerm_key_vault_certificate.serving.versionless_secret_id]
      }
      authenticationSettings = {
        msiEndpoint = "http://169.254.169.254/metadata/identity/oauth2/token"
        msiClientId = azurerm_user_assigned_identity.relay.client_id
      }
    })
  }

  lifecycle {
    precondition {
      condition     = var.obo_app_client_id != null || length([for c in var.clusters : c if c.upstream_auth == "on_behalf_of"]) == 0
      error_message = "Clusters in mode on_behalf_of need obo_app_client_id (the relay's app registration)."
    }
  }

  depends_on = [
    azurerm_role_assignment.relay_reads_certificate,
    azurerm_lb_rule.https,
    azurerm_private_endpoint.vault,
  ]
}
