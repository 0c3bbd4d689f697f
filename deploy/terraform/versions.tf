# kube-relay in an Azure hub network: reference deployment on a VM scale set.
# See docs/deploy-hub.md for the walk-through and docs/validation.md for what CI checks here.
terraform {
  required_version = ">= 1.6.0"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.42"
    }
  }
}

provider "azurerm" {
  features {
    key_vault {
      # Keep soft-deleted certificates recoverable; never purge on destroy.
      purge_soft_delete_on_destroy = false
    }
  }
  subscription_id = var.subscription_id
}

data "azurerm_client_config" "current" {}
