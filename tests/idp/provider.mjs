// A real OpenID Connect issuer for kube-relay's integration tests: `oidc-provider` (pinned in
// package.json) on 127.0.0.1 behind HTTPS. Nothing here contacts the network.
//
//   node provider.mjs --cert FILE --key FILE --keys FILE [--port N] [--client-id ID]
//                     [--client-secret SECRET] [--resource URI]... [--no-nbf] [--parent-stdin]
//
// --cert/--key   PEM server certificate and key for the HTTPS listener.
// --keys         JSON signing keys: {"keys": [...]}, each entry either a private JWK, or
//                {"kid": "...", "pem": "-----BEGIN PRIVATE KEY-----..."} (PKCS#8, RSA or P-256),
//                converted here. The FIRST RS256 key signs tokens; every key is published in the
//                JWKS, so a rotation writes [new, old] and old tokens stay verifiable.
// --port         listen port (default 0: any free port).
// --client-id/--client-secret  the one confidential client (client_secret_basic or _post),
//                allowed the client_credentials grant only (default kube-relay-ci / ci-secret).
// --resource     a resource indicator (RFC 8707) the client may ask for; repeatable (default
//                api://kube-relay). An access token for resource R is a JWT (RFC 9068) with
//                aud = R, sub = client_id, RS256.
// --no-nbf       issue tokens exactly as stock oidc-provider does (no `nbf`). By default an
//                `nbf` = `iat` claim is added, because kube-relay requires `nbf` (docs/architecture.md "Identity and upstream credentials").
// --parent-stdin exit when stdin reaches EOF (the parent died), besides on SIGTERM / SIGINT.
//
// People signing in (kube-relay token, the browser portal), all off unless a flag names them:
// --cli-client-id ID   a public native client (token_endpoint_auth_method none) for
//                `kube-relay token`: authorization_code (PKCE required), refresh_token and
//                device_code grants; redirect http://127.0.0.1/callback, any port (RFC 8252 §7.3:
//                oidc-provider ignores the port of a loopback http redirect of a native client).
// --portal-client-id ID --portal-client-secret SECRET --portal-redirect URI
//                a confidential web client for the relay's portal: authorization_code (PKCE
//                required) and refresh_token, the one redirect URI given.
// --portal-post-logout URI  where the provider's sign-out page (RP-initiated logout,
//                /session/end) may send the browser back to, for the portal client.
// --portal-client-auth METHOD  how the portal client authenticates at the token endpoint:
//                client_secret_basic (default) or client_secret_post.
// --access-token-ttl SECONDS  lifetime of access tokens for a resource (default 300), short in
//                tests of refresh.
// With either client the provider enables its development sign-in pages (devInteractions): a
// login form (accounts below, any password) then a consent page with [ Cancel ] (access_denied),
// and the device flow (verification page /device). Accounts: `alice` (groups ["sre"]) and `bob`
// (groups ["dev"]); any other login is an account without groups. Access tokens for a resource
// carry sub = login name and `groups`; so do ID tokens. A client allowed the refresh_token
// grant that asks for `offline_access` gets a refresh token (see the prompt=consent note below).
//
// Step-up: an authorization request with Entra's `claims` parameter asking for authentication
// contexts in the access token (`{"access_token":{"acrs":{"essential":true,"value":"c1"}}}`)
// gets them as the access token's `acrs` claim, and so do that sign-in's refreshed tokens
// (kube-relay's `token --auth-context`). These pages have no second factor to ask for.
//
// Key rotation: send SIGHUP. The --keys file is re-read and a fresh Provider (same issuer,
// client and port; the listener stays up) takes over every later request.
//
// stdout carries one JSON object per line:
//   {"event":"listening","port":N,"issuer":"https://127.0.0.1:N","kids":[...]}   once, when ready
//   {"event":"request","method":"GET","path":"/jwks"}                        each request
//   {"event":"token","grant_type":"refresh_token","client_id":"...","status":200,"error":null}
//                                                              after each token endpoint answer
//   {"event":"reloaded","kids":[...]}                                         after a SIGHUP
//   {"event":"reload_failed","error":"..."}                                   bad key file on SIGHUP
// Diagnostics go to stderr (oidc-provider prints a few notices of its own on stdout: readers
// skip lines that are not JSON).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    keys: { type: 'string' },
    port: { type: 'string', default: '0' },
    'client-id': { type: 'string', default: 'kube-relay-ci' },
    'client-secret': { type: 'string', default: 'ci-secret' },
    resource: { type: 'string', multiple: true },
    'no-nbf': { type: 'boolean', default: false },
    'cli-client-id': { type: 'string' },
    'portal-client-id': { type: 'string' },
    'portal-client-secret': { type: 'string' },
    'portal-redirect': { type: 'string' },
    'portal-post-logout': { type: 'string' },
    'portal-client-auth': { type: 'string', default: 'client_secret_basic' },
    'access-token-ttl': { type: 'string', default: '300' },
    'parent-stdin': { type: 'boolean', default: false },
  },
  strict: true,
});

for (const required of ['cert', 'key', 'keys']) {
  if (!args[required]) {
    process.stderr.write(`provider.mjs: --${required} is required\n`);
    process.exit(2);
  }
}

const resources = new Set(args.resource?.length ? args.resource : ['api://kube-relay']);

const accessTokenTTL = Number(args['access-token-ttl']);
if (!Number.isInteger(accessTokenTTL) || accessTokenTTL < 1) {
  process.stderr.write('provider.mjs: --access-token-ttl must be a positive whole number of seconds\n');
  process.exit(2);
}
const portalFlags = ['portal-client-id', 'portal-client-secret', 'portal-redirect'];
if (portalFlags.some((f) => args[f]) && !portalFlags.every((f) => args[f])) {
  process.stderr.write(`provider.mjs: ${portalFlags.map((f) => `--${f}`).join(', ')} go together\n`);
  process.exit(2);
}
if (!['client_secret_basic', 'client_secret_post'].includes(args['portal-client-auth'])) {
  process.stderr.write('provider.mjs: --portal-client-auth is client_secret_basic or client_secret_post\n');
  process.exit(2);
}
// People can sign in (login + consent pages, device flow) when a client for them exists.
const interactive = Boolean(args['cli-client-id'] || args['portal-client-id']);

// The people who can sign in: login name -> groups. Any other login is an account without groups.
const ACCOUNTS = { alice: ['sre'], bob: ['dev'] };
const groupsOf = (accountId) => ACCOUNTS[accountId] ?? [];

function clients() {
  const list = [{
    client_id: args['client-id'],
    client_secret: args['client-secret'],
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  }];
  if (args['cli-client-id']) {
    list.push({
      client_id: args['cli-client-id'],
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
    });
  }
  if (args['portal-client-id']) {
    list.push({
      client_id: args['portal-client-id'],
      client_secret: args['portal-client-secret'],
      application_type: 'web',
      token_endpoint_auth_method: args['portal-client-auth'],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: [args['portal-redirect']],
      post_logout_redirect_uris: args['portal-post-logout'] ? [args['portal-post-logout']] : [],
    });
  }
  return list;
}

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

// Reads the --keys file into private JWKs with `kid`, `alg` and `use` set.
function loadKeys(file) {
  const doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (!Array.isArray(doc.keys) || doc.keys.length === 0) {
    throw new Error(`${file}: expected {"keys": [...]} with at least one key`);
  }
  return doc.keys.map((entry, i) => {
    let jwk;
    if (entry.pem) {
      jwk = crypto.createPrivateKey(entry.pem).export({ format: 'jwk' });
    } else if (entry.kty) {
      jwk = { ...entry };
    } else {
      throw new Error(`${file}: keys[${i}] is neither a JWK nor {kid, pem}`);
    }
    if (!entry.kid) throw new Error(`${file}: keys[${i}] has no kid`);
    if (!jwk.d) throw new Error(`${file}: keys[${i}] is not a private key`);
    jwk.kid = entry.kid;
    jwk.use = 'sig';
    if (jwk.kty === 'RSA') jwk.alg = 'RS256';
    else if (jwk.kty === 'EC' && jwk.crv === 'P-256') jwk.alg = 'ES256';
    else throw new Error(`${file}: keys[${i}] must be RSA or EC P-256`);
    return jwk;
  });
}

function makeProvider(issuer, keys) {
  // Tokens are signed with the first RS256 key; name it explicitly so the choice never depends
  // on oidc-provider's keystore order.
  const signer = keys.find((k) => k.alg === 'RS256');
  if (!signer) throw new Error('the key set needs at least one RSA key (RS256)');
  const provider = new Provider(issuer, {
    jwks: { keys },
    clients: clients(),
    // Signs the IdP's own session and interaction cookies (sign-in pages); random per process
    // and fixed across SIGHUP reloads.
    cookies: { keys: [cookieKey] },
    ttl: {
      ClientCredentials: 300,
      AccessToken: accessTokenTTL,
      RefreshToken: 24 * 3600,
      DeviceCode: 600,
    },
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return { sub, groups: groupsOf(sub) };
        },
      };
    },
    // `groups` with the openid scope, in ID tokens as well as from userinfo.
    claims: { openid: ['sub', 'groups'] },
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: interactive },
      deviceFlow: { enabled: interactive },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // No default resource: a request without `resource` gets an opaque token (which no
        // relay can verify); the tests always name one.
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, resourceIndicator) => {
          if (!resources.has(resourceIndicator)) throw new errors.InvalidTarget();
          return {
            scope: 'kube',
            audience: resourceIndicator,
            accessTokenTTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256', kid: signer.kid } },
          };
        },
      },
    },
    formats: {
      customizers: {
        async jwt(ctx, token, jwt) {
          if (!args['no-nbf']) jwt.payload.nbf = jwt.payload.iat;
          // A person's token (not client credentials): sub is already the login name.
          if (token.accountId) jwt.payload.groups = groupsOf(token.accountId);
          const acrs = stepUpOf(ctx, token);
          if (acrs.length > 0) jwt.payload.acrs = acrs;
        },
      },
    },
  });
  // OIDC Core §11: oidc-provider ignores `offline_access` in an authorization request without
  // prompt=consent, so a client asking for it would get no refresh token. Entra and most
  // providers grant it as asked; so does this one, by adding prompt=consent to such requests
  // (people see the consent page either way: oidc-provider always asks for native clients).
  // Device authorization requests have no prompt and keep offline_access as they are.
  provider.use(async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/auth') {
      const q = new URLSearchParams(ctx.querystring);
      if ((q.get('scope') ?? '').split(' ').includes('offline_access') && !q.has('prompt')) {
        q.set('prompt', 'consent');
        ctx.querystring = q.toString();
      }
    }
    await next();
  });
  // Step-up requests: oidc-provider's own `claims` parameter knows only `userinfo` and
  // `id_token`, so the access-token part is taken off the request here and remembered by the
  // PKCE challenge, which the code exchange proves with its verifier (see stepUpOf).
  provider.use(async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/auth') {
      const q = new URLSearchParams(ctx.querystring);
      if (q.has('claims')) {
        const acrs = requestedAcrs(q.get('claims'));
        const challenge = q.get('code_challenge');
        if (acrs.length > 0 && challenge) stepUps.set(`challenge:${challenge}`, acrs);
        q.delete('claims');
        ctx.querystring = q.toString();
      }
    }
    await next();
  });
  // One line per token endpoint answer, so tests can count sign-ins, refreshes and device polls.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route === 'token') {
      emit({
        event: 'token',
        grant_type: ctx.oidc.params?.grant_type ?? null,
        client_id: ctx.oidc.client?.clientId ?? null,
        status: ctx.status,
        error: ctx.body?.error ?? null,
      });
    }
  });
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`provider.mjs: server_error: ${err?.stack ?? err}\n`);
  });
  return provider;
}

// Authentication contexts granted by step-up sign-ins: by PKCE challenge until the code is
// exchanged, then by grant (for refreshes).
const stepUps = new Map();

function requestedAcrs(claims) {
  try {
    const acrs = JSON.parse(claims)?.access_token?.acrs;
    if (!acrs) return [];
    const values = [...(acrs.value ? [acrs.value] : []), ...(acrs.values ?? [])];
    return values.filter((v) => typeof v === 'string' && /^[A-Za-z0-9]{1,64}$/.test(v));
  } catch {
    return [];
  }
}

function stepUpOf(ctx, token) {
  const byGrant = token.grantId && stepUps.get(`grant:${token.grantId}`);
  if (byGrant) return byGrant;
  const verifier = ctx?.oidc?.params?.code_verifier;
  if (!verifier) return [];
  const challenge = crypto.createHash('sha256').update(verifier).digest('base64url');
  const acrs = stepUps.get(`challenge:${challenge}`) ?? [];
  stepUps.delete(`challenge:${challenge}`);
  if (acrs.length > 0 && token.grantId) stepUps.set(`grant:${token.grantId}`, acrs);
  return acrs;
}

const cookieKey = crypto.randomBytes(32).toString('hex');

const tls = {
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
};

let handler = null;
const server = https.createServer(tls, (req, res) => {
  emit({ event: 'request', method: req.method, path: (req.url ?? '').split('?')[0] });
  handler(req, res);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['parent-stdin']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}

server.on('error', (err) => {
  process.stderr.write(`provider.mjs: ${err.stack ?? err}\n`);
  process.exit(1);
});

let keys;
try {
  keys = loadKeys(args.keys);
} catch (err) {
  process.stderr.write(`provider.mjs: ${err.message ?? err}\n`);
  process.exit(1);
}

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://127.0.0.1:${port}`;
  try {
    handler = makeProvider(issuer, keys).callback();
  } catch (err) {
    process.stderr.write(`provider.mjs: ${err.stack ?? err}\n`);
    process.exit(1);
  }

  process.on('SIGHUP', () => {
    try {
      const next = loadKeys(args.keys);
      handler = makeProvider(issuer, next).callback();
      emit({ event: 'reloaded', kids: next.map((k) => k.kid) });
    } catch (err) {
      emit({ event: 'reload_failed', error: String(err?.message ?? err) });
    }
  });

  emit({
    event: 'listening', port, issuer, kids: keys.map((k) => k.kid),
  });
});
