//! Relay configurations for tests, built from parts instead of written out whole: the frame every
//! test relay shares (a loopback listener, the test certificate from `tenant::test_pki`) comes
//! from [`RelayYaml::new`], the test tenant's issuer from [`contoso`], and each test adds only
//! what its story is about, still as the YAML a user would write.

/// A relay configuration under construction.
pub struct RelayYaml {
    top: Vec<String>,
    issuers: Vec<String>,
    clusters: Vec<String>,
}

impl RelayYaml {
    /// `listen: 127.0.0.1:0`, `public_url`, and `tls` with `relay.crt` / `relay.key` from the
    /// configuration's directory.
    pub fn new(public_url: &str) -> Self {
        Self {
            top: vec![
                "listen: 127.0.0.1:0".into(),
                format!("public_url: {public_url}"),
                "tls: {cert_file: relay.crt, key_file: relay.key}".into(),
            ],
            issuers: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// Replaces the `tls` section (e.g. to publish the CA with `ca_file`).
    pub fn tls(mut self, yaml: impl Into<String>) -> Self {
        self.top[2] = yaml.into();
        self
    }

    /// Any other top-level YAML (`admin`, `routing`, `audit`, `limits`, `login` ...), in order.
    pub fn top(mut self, yaml: impl Into<String>) -> Self {
        self.top.push(yaml.into());
        self
    }

    /// One `identity.issuers` entry, as block YAML without the list dash.
    pub fn issuer(mut self, yaml: impl Into<String>) -> Self {
        self.issuers.push(yaml.into());
        self
    }

    /// One `clusters` entry, as block YAML without the list dash.
    pub fn cluster(mut self, yaml: impl Into<String>) -> Self {
        self.clusters.push(yaml.into());
        self
    }

    /// The configuration file's text.
    pub fn build(&self) -> String {
        let mut out = self.top.join("\n");
        out.push('\n');
        if !self.issuers.is_empty() {
            out.push_str("identity:\n  issuers:\n");
            for i in &self.issuers {
                out.push_str(&item(i, 4));
            }
        }
        if !self.clusters.is_empty() {
            out.push_str("clusters:\n");
            for c in &self.clusters {
                out.push_str(&item(c, 2));
            }
        }
        out
    }
}

/// `yaml` as a list item indented by `indent`: a dash before the first line, the rest aligned.
fn item(yaml: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (n, line) in yaml.trim_end().lines().enumerate() {
        let lead = if n == 0 { "- " } else { "  " };
        out.push_str(&format!("{pad}{lead}{line}\n"));
    }
    out
}

/// The test tenant (`support::tenant::TID`) as the Entra issuer `contoso` at `authority`,
/// trusted through `ca_file`, for `audiences` (a YAML flow list's items); `extra` adds keys.
pub fn contoso(authority: &str, ca_file: &str, audiences: &str, extra: &str) -> String {
    let mut y = format!(
        "name: contoso\nkind: entra\ntenant_id: {tid}\nauthority_host: {authority}\n\
         ca_file: {ca_file}\naudiences: [{audiences}]\n",
        tid = super::tenant::TID
    );
    y.push_str(extra.trim_end());
    y
}

/// The cluster `aks`: the simulated AKS of `tenant::aks_stand_in` listening on `port`, reached
/// with the relay's ServiceAccount token (impersonate mode); `access` is the block list of rules.
pub fn aks_stand_in(port: u16, access: &str) -> String {
    format!(
        "name: aks\nserver: https://aks.privatelink.test:{port}\nconnect: 127.0.0.1:{port}\n\
         ca_file: aks-ca.crt\nupstream_auth: {{mode: impersonate, token_file: relay-token}}\n\
         access:\n{access}"
    )
}
