# An L4 Standard load balancer: TLS passes through untouched and terminates on the relay, which
# needs the SNI to route by cluster name. Public or internal by var.load_balancer_type.

resource "azurerm_public_ip" "relay" {
  count               = var.load_balancer_type == "public" ? 1 : 0
  name                = "pip-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  allocation_method   = "Static"
  sku                 = "Standard"
  zones               = var.zones
  tags                = var.tags
}

resource "azurerm_lb" "relay" {
  name                = "lb-${var.name}-relay"
  location            = azurerm_resource_group.hub.location
  resource_group_name = azurerm_resource_group.hub.name
  sku                 = "Standard"
  tags                = var.tags

  frontend_ip_configuration {
    name                          = "relay"
    public_ip_address_id          = one(azurerm_public_ip.relay[*].id)
    subnet_id                     = var.load_balancer_type == "internal" ? azurerm_subnet.relay.id : null
    private_ip_address_allocation = var.load_balancer_type == "internal" ? "Static" : null
    private_ip_address            = var.load_balancer_type == "internal" ? var.internal_lb_ip : null
    zones                         = var.load_balancer_type == "internal" ? var.zones : null
  }
}

resource "azurerm_lb_backend_address_pool" "relay" {
  name            = "relay"
  loadbalancer_id = azurerm_lb.relay.id
}

# Readiness, not liveness: /readyz is 503 until every issuer's signing keys are loaded (an
# instance that cannot validate tokens gets no traffic), and the probe fails as soon as a
# stopping instance closes its listeners. 2 probes 5 s apart: out of rotation within ~10 s.
resource "azurerm_lb_probe" "ready" {
  name                = "readyz"
  loadbalancer_id     = azurerm_lb.relay.id
  protocol            = "Http"
  port                = 9090
  request_path        = "/readyz"
  interval_in_seconds = 5
  number_of_probes    = 2
}

resource "azurerm_lb_rule" "https" {
  name                           = "https"
  loadbalancer_id                = azurerm_lb.relay.id
  frontend_ip_configuration_name = "relay"
  protocol                       = "Tcp"
  frontend_port                  = 443
  backend_port                   = 8443
  backend_address_pool_ids       = [azurerm_lb_backend_address_pool.relay.id]
  probe_id                       = azurerm_lb_probe.ready.id
  # Watches and exec sessions are long-lived; the relay also sends HTTP/2 pings upstream.
  idle_timeout_in_minutes = 30
  tcp_reset_enabled       = true
  # Outbound goes through the NAT gateway, never through load balancer SNAT.
  disable_outbound_snat = true
}
