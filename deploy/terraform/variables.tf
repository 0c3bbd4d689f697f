variable "subscription_id" {
  description = "Subscription holding the hub."
  type        = string
}

variable "location" {
  description = "Azure region of the hub (e.g. westeurope)."
  type        = string
}

variable "name" {
  description = "Prefix for every resource name (lower-case letters and digits, 3-12 characters)."
  type        = string
  default     = "kuberelay"
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{2,11}$", var.name))
    error_message = "name must be 3-12 lower-case letters and digits, starting with a letter."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}

# --- network ---

variable "hub_address_space" {
  description = "Address space of the hub VNet. Must not overlap any peered cluster VNet."
  type        = list(string)
  default     = ["10.100.0.0/22"]
}

variable "relay_subnet_prefix" {
  description = "Subnet of the relay instances (and of an internal load balancer's frontend)."
  type        = string
  default     = "10.100.0.0/25"
}

variable "endpoints_subnet_prefix" {
  description = "Subnet holding the private endpoints to clusters and to Key Vault."
  type        = string
  default     = "10.100.1.0/24"
}

variable "load_balancer_type" {
  description = "internal: clients reach the relay over VPN/ExpressRoute/peering; public: a public IP (clients still need Entra tokens, and the NSG limits sources)."
  type        = string
  default     = "internal"
  validation {
    condition     = contains(["internal", "public"], var.load_balancer_type)
    error_message = "load_balancer_type must be internal or public."
  }
}

variable "internal_lb_ip" {
  description = "Static frontend IP of the internal load balancer (inside relay_subnet_prefix)."
  type        = string
  default     = "10.100.0.10"
}

variable "client_source_prefixes" {
  description = "Source prefixes allowed to reach port 443 of the relay (NSG). Keep it as narrow as your clients allow."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}

variable "monitoring_source_prefixes" {
  description = "Source prefixes allowed to scrape the admin listener (port 9090: /metrics, /healthz, /readyz)."
  type        = list(string)
  default     = []
}

variable "egress_via_nat_gateway" {
  description = "Give the relay subnet a NAT gateway for egress to Entra ID (login.microsoftonline.com). Set false when a hub firewall (UDR 0.0.0.0/0) already provides egress; docs/operations.md lists the destinations to allow."
  type        = bool
  default     = true
}

variable "deployer_ip_ranges" {
  description = "Public IP ranges of whoever runs terraform (Key Vault firewall; the vault is otherwise reached through its private endpoint)."
  type        = list(string)
  default     = []
}

# --- relay instances ---

variable "relay_instances" {
  description = "Number of relay instances (>= 2 for zero-downtime upgrades)."
  type        = number
  default     = 2
  validation {
    condition     = var.relay_instances >= 2
    error_message = "Run at least 2 relay instances."
  }
}

variable "relay_vm_size" {
  description = "VM size of the relay instances."
  type        = string
  default     = "Standard_D2as_v5"
}

variable "zones" {
  description = "Availability zones to spread instances over (empty in regions without zones)."
  type        = list(string)
  default     = ["1", "2", "3"]
}

variable "admin_ssh_public_key" {
  description = "SSH public key of the break-glass admin user (no passwords)."
  type        = string
}

variable "relay_binary_url" {
  description = "HTTPS URL of the kube-relay release binary (x86_64-linux) the instances install."
  type        = string
}

variable "relay_binary_sha256" {
  description = "SHA-256 of that binary; cloud-init refuses anything else."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.relay_binary_sha256))
    error_message = "relay_binary_sha256 must be 64 lower-case hex digits."
  }
}

# --- relay configuration ---

variable "public_host" {
  description = "The relay's public name (public_url host), e.g. relay.example.com."
  type        = string
}

variable "host_suffix" {
  description = "SNI suffix: <cluster>.<host_suffix> selects a cluster. Often the same as public_host."
  type        = string
}

variable "tenant_id" {
  description = "Entra tenant whose tokens the relay accepts."
  type        = string
}

variable "relay_audiences" {
  description = "Token audiences the relay accepts (its own app and/or the AKS server app for passthrough)."
  type        = list(string)
  default     = ["api://kube-relay", "6dae42f8-4368-4678-94ff-3960e28e3630"]
}

variable "extra_issuers" {
  description = "Further issuers, exactly as in relay.yaml identity.issuers (e.g. GitHub Actions OIDC)."
  type = list(object({
    name           = string
    kind           = string
    issuer         = optional(string)
    audiences      = list(string)
    username_claim = optional(string)
    groups_claim   = optional(string)
  }))
  default = []
}

variable "obo_app_client_id" {
  description = "Client id of the relay's Entra app registration, needed only by clusters in mode on_behalf_of (the relay's managed identity is its federated credential)."
  type        = string
  default     = null
}

variable "serving_certificate_issuer" {
  description = "Key Vault certificate issuer for the serving certificate: Self (trials) or the name of an issuer configured in the vault (DigiCert, GlobalSign, or your CA). See certs/README.md."
  type        = string
  default     = "Self"
}

variable "clusters" {
  description = <<-EOT
    Clusters behind the relay, by relay cluster name ([a-z0-9-], at most 63).
    connectivity = "private_endpoint": a private endpoint in the hub to the cluster's API server
                   (sub-resource "management"), a hub private DNS zone and record; the relay dials
                   the endpoint IP (connect) and verifies the cluster's private FQDN.
    connectivity = "peering": hub<->cluster VNet peering (vnet_id) and a link from the cluster's
                   own private DNS zone (private_dns_zone_id) to the hub; the relay resolves the
                   private FQDN through Azure DNS.
    upstream_auth = "passthrough" (callers' AKS tokens go upstream; no Azure role),
                    "impersonate" (the relay's managed identity + Impersonate-*; needs the
                    impersonation data actions on the cluster), or
                    "on_behalf_of" (Entra OBO exchange by obo_app_client_id; no Azure role).
  EOT
  type = map(object({
    aks_name            = string
    aks_resource_group  = string
    connectivity        = string
    upstream_auth       = optional(string, "passthrough")
    vnet_id             = optional(string)
    private_dns_zone_id = optional(string)
    access = optional(list(object({
      groups = optional(list(string))
      users  = optional(list(string))
      issuer = optional(string)
      claims = optional(map(string))
      verbs  = optional(list(string))
    })), [])
  }))
  default = {}
  validation {
    condition     = alltrue([for k, c in var.clusters : can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", k))])
    error_message = "Cluster names must match [a-z0-9]([-a-z0-9]*[a-z0-9])? and be at most 63 characters."
  }
  validation {
    condition     = alltrue([for c in var.clusters : contains(["private_endpoint", "peering"], c.connectivity)])
    error_message = "connectivity must be private_endpoint or peering."
  }
  validation {
    condition     = alltrue([for c in var.clusters : contains(["passthrough", "impersonate", "on_behalf_of"], c.upstream_auth)])
    error_message = "upstream_auth must be passthrough, impersonate or on_behalf_of."
  }
  validation {
    condition     = alltrue([for c in var.clusters : c.connectivity != "peering" || (c.vnet_id != null && c.private_dns_zone_id != null)])
    error_message = "peering clusters need vnet_id and private_dns_zone_id."
  }
}

variable "alert_email" {
  description = "Where Azure Monitor sends the cluster stop/start alert (private endpoints must be recreated then). Empty: no action group."
  type        = string
  default     = ""
}
