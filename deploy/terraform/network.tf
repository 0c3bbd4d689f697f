resource "azurerm_resource_group" "hub" {
  name     = "rg-${var.name}-hub"
  location = var.location
  tags     = var.tags
}

resource "azurerm_virtual_network" "hub" {
  name                = "vnet-${var.name}-hub"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  address_space       = var.hub_address_space
  tags                = var.tags
}

resource "azurerm_subnet" "relay" {
  name                 = "snet-relay"
  resource_group_name  = azurerm_resource_group.hub.name
  virtual_network_name = azurerm_virtual_network.hub.name
  address_prefixes     = [var.relay_subnet_prefix]
  # No default outbound access: egress is the NAT gateway (or the hub firewall) only.
  default_outbound_access_enabled = false
}

resource "azurerm_subnet" "endpoints" {
  name                              = "snet-endpoints"
  resource_group_name               = azurerm_resource_group.hub.name
  virtual_network_name              = azurerm_virtual_network.hub.name
  address_prefixes                  = [var.endpoints_subnet_prefix]
  private_endpoint_network_policies = "Enabled"
  default_outbound_access_enabled   = false
}

# --- NSG: 443 from clients, 9090 from the load balancer probe and monitoring only ---

resource "azurerm_network_security_group" "relay" {
  name                = "nsg-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  tags                = var.tags

  security_rule {
    name                       = "allow-clients-8443"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "8443"
    source_address_prefixes    = var.client_source_prefixes
    destination_address_prefix = var.relay_subnet_prefix
  }

  security_rule {
    name                       = "allow-lb-probe-9090"
    priority                   = 110
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "9090"
    source_address_prefix      = "AzureLoadBalancer"
    destination_address_prefix = var.relay_subnet_prefix
  }

  dynamic "security_rule" {
    for_each = length(var.monitoring_source_prefixes) > 0 ? [1] : []
    content {
      name                       = "allow-monitoring-9090"
      priority                   = 120
      direction                  = "Inbound"
      access                     = "Allow"
      protocol                   = "Tcp"
      source_port_range          = "*"
      destination_port_range     = "9090"
      source_address_prefixes    = var.monitoring_source_prefixes
      destination_address_prefix = var.relay_subnet_prefix
    }
  }

  # The default AllowVnetInBound rule would open everything to the whole (peered) network.
  security_rule {
    name                       = "deny-other-inbound"
    priority                   = 4000
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_port_range          = "*"
    destination_port_range     = "*"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }
}

resource "azurerm_subnet_network_security_group_association" "relay" {
  subnet_id                 = azurerm_subnet.relay.id
  network_security_group_id = azurerm_network_security_group.relay.id
}

# --- egress to Entra ID (token validation keys, OBO, managed identity tokens go via IMDS) ---

resource "azurerm_public_ip" "nat" {
  count               = var.egress_via_nat_gateway ? 1 : 0
  name                = "pip-${var.name}-nat"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  allocation_method   = "Static"
  sku                 = "Standard"
  zones               = var.zones
  tags                = var.tags
}

resource "azurerm_nat_gateway" "relay" {
  count               = var.egress_via_nat_gateway ? 1 : 0
  name                = "ng-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  sku_name            = "Standard"
  tags                = var.tags
}

resource "azurerm_nat_gateway_public_ip_association" "relay" {
  count                = var.egress_via_nat_gateway ? 1 : 0
  nat_gateway_id       = azurerm_nat_gateway.relay[0].id
  public_ip_address_id = azurerm_public_ip.nat[0].id
}

resource "azurerm_subnet_nat_gateway_association" "relay" {
  count          = var.egress_via_nat_gateway ? 1 : 0
  subnet_id      = azurerm_subnet.relay.id
  nat_gateway_id = azurerm_nat_gateway.relay[0].id
}

# Private endpoints accept HTTPS from the relay subnet only (endpoint network policies are on).
resource "azurerm_network_security_group" "endpoints" {
  name                = "nsg-${var.name}-endpoints"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  tags                = var.tags

  security_rule {
    name                       = "allow-relay-443"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "443"
    source_address_prefix      = var.relay_subnet_prefix
    destination_address_prefix = var.endpoints_subnet_prefix
  }

  security_rule {
    name                       = "deny-other-inbound"
    priority                   = 4000
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_port_range          = "*"
    destination_port_range     = "*"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }
}

resource "azurerm_subnet_network_security_group_association" "endpoints" {
  subnet_id                 = azurerm_subnet.endpoints.id
  network_security_group_id = azurerm_network_security_group.endpoints.id
}
