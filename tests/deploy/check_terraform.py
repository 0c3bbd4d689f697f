"""Static checks of deploy/terraform that `terraform validate` would otherwise catch, for a CI
without the terraform binary (run by tests/deploy.rs with .venv-deploy's python, which has
python-hcl2 as a checkov dependency).

Checks:
  1. every .tf file parses as HCL2;
  2. every var.X, local.X, data.T.N and T.N (azurerm resources) referenced anywhere is declared;
  3. every ${name} in cloud-init.yaml.tftpl is passed by templatefile() (or is a loop variable),
     and files read with file() exist;
  4. the facts the deployment promises: private endpoints to sub-resource "management", a
     Standard load balancer probing /readyz, the four impersonation data actions and no other
     permission, Key Vault with purge protection and RBAC, a rolling scale set of >= 2, the
     outputs that render the relay's config.
Prints one line per problem and exits 1 if there is any; prints a summary line otherwise.
"""

import json
import pathlib
import re
import sys

import hcl2

ROOT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path("deploy/terraform")
problems = []


def problem(msg):
    problems.append(msg)


# --- 1. parse ---
docs = {}
texts = {}
for tf in sorted(ROOT.glob("*.tf")):
    texts[tf.name] = tf.read_text()
    try:
        with tf.open() as f:
            docs[tf.name] = hcl2.load(f)
    except Exception as e:  # the parser raises several exception types
        problem(f"{tf.name}: does not parse: {e}")

variables, outputs, locals_, resources, data = set(), set(), set(), {}, {}
for name, doc in docs.items():
    for block in doc.get("variable", []):
        variables.update(block.keys())
    for block in doc.get("output", []):
        outputs.update(block.keys())
    for block in doc.get("locals", []):
        locals_.update(k for k in block.keys() if not k.startswith("__"))
    for block in doc.get("resource", []):
        for rtype, named in block.items():
            for rname, body in named.items():
                resources[f"{rtype}.{rname}"] = body
    for block in doc.get("data", []):
        for dtype, named in block.items():
            for dname, body in named.items():
                data[f"{dtype}.{dname}"] = body

# --- 2. references ---
for name, text in texts.items():
    for m in re.finditer(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", text):
        if m.group(1) not in variables:
            problem(f"{name}: var.{m.group(1)} is not declared")
    for m in re.finditer(r"\blocal\.([A-Za-z_][A-Za-z0-9_]*)", text):
        if m.group(1) not in locals_:
            problem(f"{name}: local.{m.group(1)} is not defined")
    for m in re.finditer(r"\bdata\.(azurerm_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_]*)", text):
        if f"{m.group(1)}.{m.group(2)}" not in data:
            problem(f"{name}: data.{m.group(1)}.{m.group(2)} is not declared")
    for m in re.finditer(r"(?<![.\w])(azurerm_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_]*)", text):
        ref = f"{m.group(1)}.{m.group(2)}"
        if ref not in resources:
            problem(f"{name}: {ref} is not a declared resource")

# --- 3. template and files ---
vmss = resources.get("azurerm_linux_virtual_machine_scale_set.relay", {})
custom_data = "".join(vmss.get("custom_data", [""]))
# The parser renders the templatefile() variables object as a Python-like dict: 'key': value.
passed = set(re.findall(r"'([a-z0-9_]+)'\s*:", custom_data.split("templatefile(", 1)[-1]))
if not passed:
    problem("vmss.tf: custom_data passes no variables to templatefile()")
tpl = (ROOT / "cloud-init.yaml.tftpl").read_text()
loop_vars = set()
for m in re.finditer(r"%\{\s*for\s+([a-z_]+)\s*(?:,\s*([a-z_]+))?\s+in\s+([a-z_]+)", tpl):
    loop_vars.update(v for v in m.groups()[:2] if v)
    if m.group(3) not in passed:
        problem(f"cloud-init.yaml.tftpl: loops over {m.group(3)}, which templatefile() does not pass")
functions = {"jsonencode", "base64encode", "yamlencode"}
for expr in re.findall(r"\$\{([^}]*)\}", tpl):
    for ident in re.findall(r"\b([a-z_][a-z0-9_]*)\b", expr):
        if ident not in passed | loop_vars | functions:
            problem(f"cloud-init.yaml.tftpl: ${{{expr}}} uses {ident}, which templatefile() does not pass")
for name, text in texts.items():
    for rel in re.findall(r'file\("\$\{path\.module\}/([^"]+)"\)', text):
        if not (ROOT / rel).exists():
            problem(f"{name}: file() reads {rel}, which does not exist")

# --- 4. promised facts ---
def first(body, key, default=None):
    v = body.get(key, [default])
    return v[0] if isinstance(v, list) and v else v


pe = resources.get("azurerm_private_endpoint.cluster")
if not pe:
    problem("no azurerm_private_endpoint.cluster")
else:
    conn = first(pe, "private_service_connection", {})
    if first(conn, "subresource_names") != ["management"]:
        problem(f"cluster private endpoints must use sub-resource management, not {first(conn, 'subresource_names')}")
lb = resources.get("azurerm_lb.relay", {})
if first(lb, "sku") != "Standard":
    problem("the load balancer must be Standard")
probe = resources.get("azurerm_lb_probe.ready", {})
if first(probe, "request_path") != "/readyz" or first(probe, "port") != 9090:
    problem("the load balancer must probe /readyz on the admin port 9090")
rule = resources.get("azurerm_lb_rule.https", {})
if first(rule, "protocol") != "Tcp" or first(rule, "backend_port") != 8443:
    problem("the load balancer must pass TCP (TLS untouched) to 8443")
role = resources.get("azurerm_role_definition.impersonate", {})
perm = first(role, "permissions", {})
want = {
    "Microsoft.ContainerService/managedClusters/users/impersonate/action",
    "Microsoft.ContainerService/managedClusters/groups/impersonate/action",
    "Microsoft.ContainerService/managedClusters/serviceaccounts/impersonate/action",
    "Microsoft.ContainerService/managedClusters/authentication.k8s.io/userextras/impersonate/action",
}
if set(first(perm, "data_actions", [])) != want or first(perm, "actions", []) != []:
    problem("the impersonation role must hold exactly the four impersonate data actions")
kv = resources.get("azurerm_key_vault.relay", {})
if first(kv, "purge_protection_enabled") is not True or first(kv, "rbac_authorization_enabled") is not True:
    problem("Key Vault needs purge protection and RBAC authorization")
if first(vmss, "upgrade_mode") != "Rolling":
    problem("the scale set must upgrade in rolling mode")
for out in ["relay_config_yaml", "cluster_ca_pem", "clusters", "private_endpoint_checks", "relay_identity"]:
    if out not in outputs:
        problem(f"output {out} is missing")
lbtype = "".join(texts.get("variables.tf", ""))
if '["internal", "public"]' not in lbtype:
    problem("variable load_balancer_type must allow internal and public")

if problems:
    for p in problems:
        print(f"terraform: {p}")
    sys.exit(1)
print(json.dumps({
    "files": len(docs),
    "variables": len(variables),
    "locals": len(locals_),
    "resources": len(resources),
    "data_sources": len(data),
    "outputs": len(outputs),
}))
