// A real browser for kube-relay's sign-in tests: Debian's chromium (/usr/bin/chromium) driven by
// playwright-core (pinned in package.json; its bundled-browser version matches Debian's
// chromium). Every page it may load is on loopback: any other request is aborted and reported.
//
//   node drive.mjs signin URL --user NAME [--until PREFIX]
//       Opens URL (an IdP authorization URL), signs in at oidc-provider's login page (any
//       password), accepts its consent page, and waits for the redirect away from the IdP (or,
//       with --until, to a URL starting with PREFIX). Prints the final URL and page text.
//   node drive.mjs device URL --code CODE --user NAME
//       Opens URL (the IdP's verification URI), enters CODE, confirms the device, signs in and
//       consents; expects oidc-provider's "Sign-in Success" page.
//   node drive.mjs portal --relay URL --user NAME --out DIR [--no-signout]
//       The relay portal journey: landing page -> "Sign in" -> IdP login + consent -> the
//       signed-in page; records the clusters (<li data-cluster>), downloads the kubeconfig
//       (#download-kubeconfig) into DIR, records the relay's cookies and their attributes, then
//       (unless --no-signout) signs out and records the signed-out page.
//   node drive.mjs deny URL [--user NAME]
//       Opens URL (the portal landing page, or any URL that leads to the IdP), signs in, and
//       cancels at the consent page; records where the browser lands (expected: the portal's
//       "Sign-in was denied" page).
//   node drive.mjs tamper --relay URL --user NAME
//       Signs in to the portal, then alters the session cookie's value and reloads the portal
//       and fetches /-/kubeconfig: records what the relay makes of the altered cookie.
//   node drive.mjs stale --relay URL --other URL2 --user NAME
//       Signs in to the portal at URL, then opens URL2 (another relay on the same host name, so
//       the browser sends it the same cookie, sealed with another key) and fetches its
//       /-/kubeconfig: records what it makes of the cookie.
//   node drive.mjs playback --relay URL --user NAME
//       Signs in to the portal, follows "Session recordings" when the page offers it (else
//       opens /-/recordings), records the listed recordings (<tr data-recording>), plays the
//       first one (or --recording NAME) with the page's asciinema-player, and records the
//       terminal's text once it
//       shows the whole recording, page errors, and the recording file's status fetched with the
//       browser's cookies. A non-auditor records the refusal page instead.
//   node drive.mjs terminal --relay URL --user NAME [--expect TEXT]
//       Signs in, follows "Open a terminal" with the keyboard, waits for the pod pickers, opens
//       a terminal in the first pod (keyboard), types `echo hello-web` and waits for its output
//       (or TEXT), resizes the window, types `exit 3` and waits for the session to end with its
//       exit code; then follows the pod's logs until some arrive and stops, and signs out.
//       Records the status line, exit code, terminal text, log text, page errors, accessibility
//       problems and the signed-out page.
//   node drive.mjs open URL
//       Opens URL; records the status, <h1> and text.
//
// Common options: --artifacts DIR (screenshots; default <repo>/target/test-artifacts/browser),
// --label NAME (screenshot file prefix; default command-user), --timeout SECONDS (each wait,
// default 20), --deadline SECONDS (the whole run, default 120).
//
// stdout: one JSON object, {"ok":true,...} or {"ok":false,"error":"...",...}; exit status 0 or 1.
// Every wait is bounded; a failure saves a screenshot and says which wait failed.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');

export const LAUNCH = {
  executablePath: '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--no-first-run',
  ],
};

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    user: { type: 'string', default: 'alice' },
    password: { type: 'string', default: 'any-password' },
    until: { type: 'string' },
    code: { type: 'string' },
    relay: { type: 'string' },
    other: { type: 'string' },
    out: { type: 'string' },
    expect: { type: 'string' },
    recording: { type: 'string' },
    'no-signout': { type: 'boolean', default: false },
    artifacts: { type: 'string', default: path.join(REPO, 'target', 'test-artifacts', 'browser') },
    label: { type: 'string' },
    timeout: { type: 'string', default: '20' },
    deadline: { type: 'string', default: '120' },
  },
  strict: true,
});

const [command, target] = positionals;
const WAIT = Number(opts.timeout) * 1000;
const label = (opts.label ?? `${command}-${opts.user}`).replace(/[^A-Za-z0-9_.-]/g, '_');
fs.mkdirSync(opts.artifacts, { recursive: true });

const result = {
  ok: false, command, user: opts.user, steps: [], screenshots: [], blocked: [], keyboard: [], a11y: {},
};

function finish(code) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(code);
}

// The whole run is bounded, whatever hangs.
const deadline = setTimeout(() => {
  result.error = `drive.mjs: the whole run exceeded ${opts.deadline}s (steps: ${result.steps.join(' > ')})`;
  finish(1);
}, Number(opts.deadline) * 1000);

class Failure extends Error {}

function fail(message) {
  throw new Failure(message);
}

function isLoopback(url) {
  try {
    const u = new URL(url);
    if (u.protocol === 'data:' || u.protocol === 'about:' || u.protocol === 'blob:') return true;
    return ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)
      || u.hostname.endsWith('.localhost');
  } catch {
    return false;
  }
}

let shot = 0;
async function screenshot(page, step) {
  shot += 1;
  const file = path.join(opts.artifacts, `${label}-${String(shot).padStart(2, '0')}-${step}.png`);
  try {
    await page.screenshot({ path: file, fullPage: true, timeout: WAIT });
    result.screenshots.push(file);
  } catch (err) {
    result.screenshot_errors ??= [];
    result.screenshot_errors.push(`${step}: ${err.message}`);
  }
}

// Runs `action` (which should make the main frame navigate) and waits, bounded, until a new
// document has committed and loaded.
async function navigating(page, what, action) {
  const committed = page.waitForEvent('framenavigated', {
    predicate: (f) => f === page.mainFrame(),
    timeout: WAIT,
  });
  await action();
  try {
    await committed;
    await page.waitForLoadState('load', { timeout: WAIT });
  } catch (err) {
    fail(`${what}: no page loaded within ${opts.timeout}s (at ${page.url()}): ${err.message}`);
  }
}

// Moves focus with Tab (as a keyboard user would) until `selector` has it, then presses Enter:
// proves the control is reachable and operable without a mouse. Bounded by `maxTabs`.
async function keyboardActivate(page, selector, what, maxTabs = 40, { navigates = true } = {}) {
  for (let i = 0; i < maxTabs; i += 1) {
    await page.keyboard.press('Tab');
    const focused = await page.evaluate((sel) => !!document.activeElement?.matches(sel), selector);
    if (focused) {
      result.keyboard.push(what);
      if (navigates) {
        await navigating(page, what, () => page.keyboard.press('Enter'));
      } else {
        await page.keyboard.press('Enter');
      }
      return;
    }
  }
  fail(`${what}: ${maxTabs} presses of Tab never focused ${selector}`);
}

// Basic accessibility facts of the current page: a language, one main landmark, an h1, a
// label for every visible form control, a name for every button and link.
async function a11yProblems(page) {
  return page.evaluate(() => {
    const problems = [];
    if (!document.documentElement.getAttribute('lang')) problems.push('html has no lang');
    if (document.querySelectorAll('main').length !== 1) problems.push('not exactly one <main>');
    if (!document.querySelector('h1')) problems.push('no h1');
    for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
      const labelled = (el.id && document.querySelector(`label[for="${el.id}"]`))
        || el.closest('label') || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
      if (!labelled) problems.push(`unlabelled ${el.outerHTML.slice(0, 80)}`);
    }
    for (const el of document.querySelectorAll('button, a[href]')) {
      const name = (el.textContent || '').trim() || el.getAttribute('aria-label');
      if (!name) problems.push(`nameless ${el.outerHTML.slice(0, 80)}`);
    }
    return problems;
  });
}

async function describe(page, response) {
  // The page has loaded: a heading is there or it is not. Only a page without one returns
  // null, never a slow renderer.
  const heading = page.locator('h1').first();
  const h1 = (await page.locator('h1').count().catch(() => 0)) > 0
    ? await heading.textContent({ timeout: WAIT }).catch(() => null)
    : null;
  const text = await page.locator('body').innerText({ timeout: WAIT }).catch(() => '');
  return {
    url: page.url(),
    status: response?.status() ?? null,
    title: await page.title().catch(() => null),
    h1: h1?.trim() ?? null,
    text: text.slice(0, 4000),
  };
}

async function goto(page, url, step) {
  result.steps.push(step);
  let response;
  try {
    response = await page.goto(url, { waitUntil: 'load', timeout: WAIT });
  } catch (err) {
    fail(`${step}: ${url} did not load within ${opts.timeout}s: ${err.message}`);
  }
  await screenshot(page, step);
  return response;
}

const origin = (url) => new URL(url).origin;

// What oidc-provider's development pages show right now.
async function idpPage(page) {
  if (await page.locator('input[name="login"]').count()) return 'login';
  if (await page.locator('input[name="prompt"][value="consent"]').count()) return 'consent';
  if (await page.locator('[id="op.deviceInputForm"]').count()) return 'device-input';
  if (await page.locator('[id="op.deviceConfirmForm"]').count()) return 'device-confirm';
  return 'other';
}

async function login(page) {
  result.steps.push('idp-login');
  await page.locator('input[name="login"]').fill(opts.user, { timeout: WAIT });
  await page.locator('input[name="password"]').fill(opts.password, { timeout: WAIT });
  await screenshot(page, 'idp-login');
  await navigating(page, 'IdP login', () => page.locator('button[type="submit"]').click({ timeout: WAIT }));
}

async function consent(page, accept) {
  result.steps.push(accept ? 'idp-consent' : 'idp-cancel');
  await screenshot(page, accept ? 'idp-consent' : 'idp-cancel');
  if (accept) {
    await navigating(page, 'IdP consent', () => page.locator('form:has(input[name="prompt"][value="consent"]) button[type="submit"]').click({ timeout: WAIT }));
  } else {
    await navigating(page, 'IdP cancel', () => page.getByText('[ Cancel ]').click({ timeout: WAIT }));
  }
}

// Completes oidc-provider's pages (login, consent) until the browser has left the IdP's origin
// (or reached `until`). With `accept` false, cancels at the consent page.
async function throughIdp(page, idpOrigin, { accept = true, until } = {}) {
  for (let i = 0; i < 8; i += 1) {
    const here = page.url();
    const done = until ? here.startsWith(until) : origin(here) !== idpOrigin;
    if (done) return;
    const kind = await idpPage(page);
    if (kind === 'login') await login(page);
    else if (kind === 'consent') await consent(page, accept);
    else {
      await screenshot(page, 'idp-unexpected');
      const d = await describe(page);
      fail(`unexpected page at the IdP (${d.url}): ${d.h1 ?? ''} ${d.text.slice(0, 500)}`);
    }
  }
  fail(`still at the IdP after 8 pages (${page.url()})`);
}

// The portal: landing page -> "Sign in" -> IdP; returns once back on the relay.
async function portalSignIn(page, relay, { accept = true } = {}) {
  await goto(page, relay, 'landing');
  const signIn = page.locator('a[href$="/-/login"], a[href*="/-/login?"]').first();
  if (!(await signIn.count())) {
    const d = await describe(page);
    fail(`the landing page has no "Sign in" link to /-/login: ${d.text.slice(0, 500)}`);
  }
  result.landing = await describe(page);
  result.a11y.landing = await a11yProblems(page);
  result.steps.push('sign-in-link');
  await keyboardActivate(page, '#sign-in', 'sign-in');
  await screenshot(page, 'after-sign-in-link');
  if (origin(page.url()) === origin(relay)) {
    const d = await describe(page);
    fail(`"Sign in" did not lead to the IdP: ${d.url}: ${d.text.slice(0, 500)}`);
  }
  result.idp_authorize_url = page.url();
  await throughIdp(page, origin(page.url()), { accept });
  await screenshot(page, accept ? 'back-on-relay' : 'denied');
}

async function relayCookies(context, relay) {
  const host = new URL(relay).hostname;
  return (await context.cookies(relay))
    .filter((c) => c.domain.replace(/^\./, '') === host)
    .map((c) => ({
      name: c.name,
      value_length: c.value.length,
      domain: c.domain,
      path: c.path,
      expires: c.expires,
      httpOnly: c.httpOnly,
      secure: c.secure,
      sameSite: c.sameSite,
    }));
}

async function signedIn(page) {
  try {
    await page.locator('ul#clusters').waitFor({ state: 'attached', timeout: WAIT });
  } catch {
    const d = await describe(page);
    fail(`no signed-in page (ul#clusters) at ${d.url}: ${d.h1 ?? ''} ${d.text.slice(0, 800)}`);
  }
  return page.locator('ul#clusters li[data-cluster]')
    .evaluateAll((els) => els.map((e) => e.getAttribute('data-cluster')));
}

// Signs in to the portal at `relay`, then collects errors the relay's pages report from then
// on (the IdP's pages ask for web fonts the test blocks): the list grows as the run goes on.
async function signInCollectingErrors(page, relay) {
  await portalSignIn(page, `${relay}/`);
  result.clusters = await signedIn(page);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  result.page_errors = errors;
}

// A GET with the browser context's cookies (as the browser would send them to that URL),
// outside the page: the portal's CSP forbids scripts and fetches in its pages. Redirects are
// not followed. The status and the first bytes of the body.
async function fetchWithCookies(context, url) {
  const r = await context.request.get(url, { maxRedirects: 0, failOnStatusCode: false, timeout: WAIT });
  const body = (await r.text()).slice(0, 1000);
  await r.dispose();
  return { status: r.status(), body };
}

async function run(page, context) {
  switch (command) {
    case 'signin': {
      if (!target) fail('signin needs a URL');
      await goto(page, target, 'authorize');
      await throughIdp(page, origin(target), { until: opts.until });
      await screenshot(page, 'final');
      result.final = await describe(page);
      break;
    }
    case 'device': {
      if (!target || !opts.code) fail('device needs a URL and --code');
      const idp = origin(target);
      await goto(page, target, 'verification');
      if ((await idpPage(page)) !== 'device-input') {
        const d = await describe(page);
        fail(`no user code form at ${d.url}: ${d.text.slice(0, 500)}`);
      }
      await page.locator('[id="op.deviceInputForm"] input[name="user_code"]').fill(opts.code, { timeout: WAIT });
      await screenshot(page, 'user-code');
      result.steps.push('user-code');
      await navigating(page, 'user code', () => page.locator('button[type="submit"][form="op.deviceInputForm"]').click({ timeout: WAIT }));
      for (let i = 0; i < 8; i += 1) {
        const kind = await idpPage(page);
        if (kind === 'device-confirm') {
          result.steps.push('device-confirm');
          await screenshot(page, 'device-confirm');
          await navigating(page, 'device confirm', () => page.locator('button[autofocus][type="submit"][form="op.deviceConfirmForm"]').click({ timeout: WAIT }));
        } else if (kind === 'login') await login(page);
        else if (kind === 'consent') await consent(page, true);
        else break;
      }
      await screenshot(page, 'final');
      result.final = await describe(page);
      if (origin(page.url()) !== idp || result.final.h1 !== 'Sign-in Success') {
        fail(`device flow did not end on "Sign-in Success": ${result.final.url}: ${result.final.h1}: ${result.final.text.slice(0, 500)}`);
      }
      break;
    }
    case 'portal': {
      if (!opts.relay || !opts.out) fail('portal needs --relay URL and --out DIR');
      const relay = opts.relay.replace(/\/$/, '');
      await portalSignIn(page, `${relay}/`);
      result.clusters = await signedIn(page);
      await screenshot(page, 'signed-in');
      result.signed_in = await describe(page);
      result.a11y.signed_in = await a11yProblems(page);
      result.cookies = await relayCookies(context, relay);
      // The kubeconfig, through the browser's own download machinery.
      fs.mkdirSync(opts.out, { recursive: true });
      const link = page.locator('#download-kubeconfig');
      result.download_href = await link.getAttribute('href', { timeout: WAIT });
      result.steps.push('download');
      const [download] = await Promise.all([
        page.waitForEvent('download', { timeout: WAIT }),
        link.click({ timeout: WAIT }),
      ]);
      const file = path.join(opts.out, download.suggestedFilename() || 'kubeconfig');
      await download.saveAs(file);
      const failure = await download.failure();
      if (failure) fail(`kubeconfig download failed: ${failure}`);
      result.kubeconfig = file;
      result.kubeconfig_suggested_name = download.suggestedFilename();
      if (!opts['no-signout']) {
        result.steps.push('sign-out');
        const signOut = page.locator('form[action$="/-/logout"] button, form[action$="/-/logout"] [type="submit"]').first();
        if (!(await signOut.count())) fail('no "Sign out" button in a form posting to /-/logout');
        result.signout_form = await page.locator('form[action$="/-/logout"]').first().evaluate((f) => ({
          method: f.method,
          action: f.getAttribute('action'),
          fields: [...f.querySelectorAll('input[type="hidden"]')].map((i) => i.name),
        }));
        await keyboardActivate(page, '#sign-out', 'sign-out');
        if (origin(page.url()) !== origin(relay)) {
          // Sign-out goes on to the provider (login.portal.sign_out_at_provider): its
          // confirmation page, then back to the relay.
          result.steps.push('provider-sign-out');
          await screenshot(page, 'provider-sign-out');
          result.provider_signout = await describe(page);
          const yes = page.locator('button[name="logout"][value="yes"]');
          if (!(await yes.count())) fail(`sign-out left the relay for ${page.url()}, not a provider sign-out page`);
          await navigating(page, 'provider sign-out', () => yes.click({ timeout: WAIT }));
          if (origin(page.url()) !== origin(relay)) {
            const d = await describe(page);
            fail(`the provider did not send the browser back to the relay: ${d.url}: ${d.text.slice(0, 500)}`);
          }
        }
        await screenshot(page, 'signed-out');
        result.signed_out = await describe(page);
        result.signed_out.has_clusters = (await page.locator('ul#clusters').count()) > 0;
        result.cookies_after_signout = await relayCookies(context, relay);
        // Once more from the start: the landing page must not know the user any more.
        await goto(page, `${relay}/`, 'landing-after-sign-out');
        result.after_signout = await describe(page);
        result.after_signout.has_clusters = (await page.locator('ul#clusters').count()) > 0;
        result.after_signout.kubeconfig = await fetchWithCookies(context, `${relay}/-/kubeconfig`);
        // "Sign in" once more: does the provider still know this browser? 'login' (it asks
        // for a password again), or 'relay' / 'consent' (it remembered the session).
        result.steps.push('sign-in-again');
        await navigating(page, 'sign in again', () => page.locator('#sign-in').click({ timeout: WAIT }));
        result.sign_in_again = origin(page.url()) === origin(relay) ? 'relay' : await idpPage(page);
        await screenshot(page, 'sign-in-again');
      }
      break;
    }
    case 'deny': {
      if (!target) fail('deny needs a URL');
      const start = target;
      if (opts.relay || /\/$|\/-\/login/.test(new URL(start).pathname)) {
        await portalSignIn(page, start, { accept: false });
      } else {
        await goto(page, start, 'authorize');
        await throughIdp(page, origin(start), { accept: false });
        await screenshot(page, 'denied');
      }
      result.final = await describe(page);
      result.final.has_clusters = (await page.locator('ul#clusters').count()) > 0;
      result.cookies = await relayCookies(context, origin(start));
      break;
    }
    case 'tamper': {
      if (!opts.relay) fail('tamper needs --relay URL');
      const relay = opts.relay.replace(/\/$/, '');
      await portalSignIn(page, `${relay}/`);
      result.clusters = await signedIn(page);
      const host = new URL(relay).hostname;
      const cookies = (await context.cookies(relay)).filter((c) => c.domain.replace(/^\./, '') === host);
      if (!cookies.length) fail('signed in, but the relay set no cookie');
      result.before = await fetchWithCookies(context, `${relay}/-/kubeconfig`);
      // Flip one character in the middle of every relay cookie, keeping its alphabet.
      const tampered = cookies.map((c) => {
        const i = Math.floor(c.value.length / 2);
        const ch = c.value[i];
        const swap = ch === 'A' ? 'B' : 'A';
        return { ...c, value: c.value.slice(0, i) + swap + c.value.slice(i + 1) };
      });
      result.tampered = tampered.map((c) => c.name);
      await context.addCookies(tampered);
      const response = await goto(page, `${relay}/`, 'after-tamper');
      result.after = await describe(page, response);
      result.after.has_clusters = (await page.locator('ul#clusters').count()) > 0;
      result.after.kubeconfig = await fetchWithCookies(context, `${relay}/-/kubeconfig`);
      break;
    }
    case 'stale': {
      if (!opts.relay || !opts.other) fail('stale needs --relay URL --other URL2');
      const relay = opts.relay.replace(/\/$/, '');
      const other = opts.other.replace(/\/$/, '');
      if (new URL(relay).hostname !== new URL(other).hostname) {
        fail('--relay and --other must share a host name (the browser then sends both the same cookies)');
      }
      await portalSignIn(page, `${relay}/`);
      result.clusters = await signedIn(page);
      result.cookies = await relayCookies(context, relay);
      const response = await goto(page, `${other}/`, 'other-relay');
      result.after = await describe(page, response);
      result.after.has_clusters = (await page.locator('ul#clusters').count()) > 0;
      result.after.kubeconfig = await fetchWithCookies(context, `${other}/-/kubeconfig`);
      break;
    }
    case 'playback': {
      if (!opts.relay) fail('playback needs --relay URL');
      const relay = opts.relay.replace(/\/$/, '');
      await signInCollectingErrors(page, relay);
      const link = page.locator('#recordings-link');
      result.offered = (await link.count()) > 0;
      let response;
      if (result.offered) {
        await keyboardActivate(page, '#recordings-link', 'recordings-link');
      } else {
        response = await goto(page, `${relay}/-/recordings`, 'recordings');
      }
      await screenshot(page, 'recordings');
      result.list = await describe(page, response);
      result.a11y.list = await a11yProblems(page);
      result.recordings = await page.locator('tr[data-recording]')
        .evaluateAll((els) => els.map((e) => e.getAttribute('data-recording')));
      if (!result.recordings.length) break;
      const name = opts.recording ?? result.recordings[0];
      if (!result.recordings.includes(name)) fail(`${name} is not listed`);
      await navigating(page, 'play', () => page.locator(`tr[data-recording="${name}"] a`).first().click());
      // The player is ready once it made its terminal; then play to the end and read it.
      await page.locator('#player .ap-player').waitFor({ state: 'attached', timeout: WAIT });
      await page.evaluate(() => window.kubeRelayPlayer.play());
      const expect = opts.expect ?? '';
      try {
        await page.waitForFunction(
          (text) => (document.querySelector('#player')?.innerText ?? '').includes(text),
          expect,
          { timeout: WAIT },
        );
      } catch {
        // recorded below: the test says what was missing
      }
      await screenshot(page, 'played');
      result.terminal = await page.locator('#player').innerText();
      result.file = await fetchWithCookies(context, `${relay}/-/recordings/file/${name}`);
      break;
    }
    case 'terminal': {
      if (!opts.relay) fail('terminal needs --relay URL');
      const relay = opts.relay.replace(/\/$/, '');
      await signInCollectingErrors(page, relay);
      await keyboardActivate(page, '#terminal-link', 'terminal-link');
      await page.locator('#terminal-app').waitFor({ state: 'attached', timeout: WAIT });
      result.a11y.terminal = await a11yProblems(page);
      // The pickers fill from the cluster through the gateway.
      await page.waitForFunction(() => {
        const pod = document.querySelector('#pod');
        return pod && pod.options.length && pod.value;
      }, null, { timeout: WAIT });
      result.pods = await page.locator('#pod option').evaluateAll((os) => os.map((o) => o.value));
      await keyboardActivate(page, '#open-terminal', 'open-terminal', 40, { navigates: false });
      await page.waitForFunction(() => document.querySelector('#terminal-app').dataset.session === 'open', null, { timeout: WAIT });
      const shown = (text) => page.waitForFunction(
        (t) => (document.querySelector('#terminal')?.innerText ?? '').includes(t), text, { timeout: WAIT },
      );
      await page.keyboard.type('echo hello-web');
      await page.keyboard.press('Enter');
      await shown(opts.expect ?? 'hello-web');
      await screenshot(page, 'terminal');
      // A smaller window: the terminal fits itself and tells the pod its new size.
      await page.setViewportSize({ width: 900, height: 700 });
      await page.keyboard.type('exit 3');
      await page.keyboard.press('Enter');
      await page.waitForFunction(() => document.querySelector('#terminal-app').dataset.session === 'closed', null, { timeout: WAIT });
      result.exit_code = await page.locator('#exit-code').innerText();
      result.status_after_exit = await page.locator('#terminal-status').innerText();
      result.terminal = await page.locator('#terminal').innerText();
      // F6 leaves the terminal (which keeps Tab for the shell); then Tab on to the logs.
      await page.keyboard.press('F6');
      await keyboardActivate(page, '#follow-logs', 'follow-logs', 40, { navigates: false });
      await page.waitForFunction(() => (document.querySelector('#logs')?.textContent ?? '').length > 0, null, { timeout: WAIT });
      result.logs = (await page.locator('#logs').textContent()).slice(0, 2000);
      await keyboardActivate(page, '#stop-logs', 'stop-logs', 40, { navigates: false });
      await page.waitForFunction(() => document.querySelector('#terminal-app').dataset.logs === 'stopped', null, { timeout: WAIT });
      await screenshot(page, 'logs');
      result.status = await page.locator('#terminal-status').innerText();
      // Back to the portal's page and sign out, with the keyboard: the journey's end.
      await goto(page, `${relay}/`, 'home-after-terminal');
      await keyboardActivate(page, '#sign-out', 'sign-out');
      await screenshot(page, 'signed-out');
      result.signed_out = await describe(page);
      result.signed_out.has_clusters = (await page.locator('ul#clusters').count()) > 0;
      result.signed_out.terminal = (await fetchWithCookies(context, `${relay}/-/terminal`)).status;
      break;
    }
    case 'open': {
      if (!target) fail('open needs a URL');
      const response = await goto(page, target, 'open');
      result.final = await describe(page, response);
      break;
    }
    default:
      fail(`unknown command ${JSON.stringify(command)} (signin, device, portal, deny, tamper, stale, playback, terminal, open)`);
  }
}

let browser;
let page;
try {
  browser = await chromium.launch({ ...LAUNCH, timeout: WAIT });
  // The test CAs are private: certificate errors are ignored, and only loopback is reachable.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, acceptDownloads: true });
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (isLoopback(url)) return route.continue();
    result.blocked.push(url);
    return route.abort('blockedbyclient');
  });
  context.setDefaultTimeout(WAIT);
  context.setDefaultNavigationTimeout(WAIT);
  page = await context.newPage();
  await run(page, context);
  result.ok = true;
} catch (err) {
  result.error = err instanceof Failure ? err.message : (err?.stack ?? String(err));
  result.url = page?.url();
  if (page) await screenshot(page, 'failure');
}
// Closing is best effort and bounded: the result is what matters.
await Promise.race([
  browser?.close().catch(() => {}),
  new Promise((resolve) => { setTimeout(resolve, 5000).unref(); }),
]);
finish(result.ok ? 0 : 1);
