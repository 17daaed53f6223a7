// End-to-end test of the script editor page in a real headless Chromium.
//
//   node tests/browser/editor.mjs SERVER_URL BUCKET_ID SECRET_KEY
//
// Run by tests/e2e/editor.rs against a fresh server; ./test.sh installs what it
// needs (Debian's chromium, `npm ci` here). Prints one line per check and
// exits non-zero with the failed check on the first failure.

import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
// This machine reaches no network but package registries: without the
// background-networking flags Chromium's own connections get refused.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const TARGET = fileURLToPath(new URL('../../target/', import.meta.url));
const SCREENSHOT = TARGET + 'editor-screenshot.png';
const FAILURE_SCREENSHOT = TARGET + 'editor-failure.png';

const [server, bucket, secret] = process.argv.slice(2);
if (!server || !bucket || !secret) {
  console.error('usage: node editor.mjs SERVER_URL BUCKET_ID SECRET_KEY');
  process.exit(2);
}
const base = server.replace(/\/+$/, '');
const origin = new URL(base).origin;
const scriptUrl = `${base}/${bucket}/scripts/hello`;
const editUrl = `${scriptUrl}/edit`;
const adminAuth = 'Basic ' + Buffer.from(`${secret}:`).toString('base64');

const BROKEN = 'local greeting = "Hello "\nkvdb.say(greeting .. )\n';
const FIXED = 'kvdb.say("Hello " .. kvdb.escape_html(kvdb.var.name))';
// Starts with a blank line (HTML drops one newline after <textarea>) and tells
// in whose scope it runs (the bucket must not be writable anonymously).
const WHOAMI = '\n-- line 2\nlocal err = kvdb.set("editor-test", "1")\nkvdb.say("write: ", err or "allowed")\n';

class CheckFailed extends Error {}

function check(condition, what, actual) {
  if (!condition) {
    const shown = actual === undefined ? '' : `\n  actual: ${JSON.stringify(actual)}`;
    throw new CheckFailed(`${what}${shown}`);
  }
  console.log(`ok - ${what}`);
}

/** The stored scripts of the bucket, straight from the API (not the page). */
async function storedScripts() {
  const response = await fetch(`${base}/${bucket}/scripts/`, {
    headers: { Authorization: adminAuth, Accept: 'application/json' },
  });
  if (response.status !== 200) {
    throw new CheckFailed(`listing scripts: HTTP ${response.status}: ${await response.text()}`);
  }
  return (await response.json()).map((s) => s.name);
}

/** Uploads a script straight through the API. */
async function upload(name, source) {
  const response = await fetch(`${base}/${bucket}/scripts/${name}`, {
    method: 'PUT',
    headers: { Authorization: adminAuth, 'Content-Type': 'text/x-lua' },
    body: source,
  });
  if (response.status !== 200) {
    throw new CheckFailed(`uploading ${name}: HTTP ${response.status}: ${await response.text()}`);
  }
}

/** A new browser context: its own cookie and HTTP auth caches. */
async function newPage(browser, problems) {
  const context = await browser.newContext({
    httpCredentials: { username: secret, password: '' },
    viewport: { width: 1100, height: 900 },
  });
  context.setDefaultTimeout(15_000);
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('request', (r) => {
    if (new URL(r.url()).origin !== origin) problems.push(`request beyond the server: ${r.url()}`);
  });
  return page;
}

/** Clicks Save and waits for the outcome in `#status`. */
async function save(page) {
  await page.click('#save');
  await page.waitForFunction(() => {
    const text = document.getElementById('status').textContent;
    return text !== '' && text !== 'Saving…';
  });
  return {
    status: await page.textContent('#status'),
    error: await page.textContent('#error'),
  };
}

/** Clicks Run and waits for the response in `#result`. */
async function run(page) {
  await page.evaluate(() => { document.getElementById('result').textContent = ''; });
  await page.click('#run');
  await page.waitForFunction(() => {
    const text = document.getElementById('result').textContent;
    return text !== '' && text !== 'Running…';
  });
  return page.textContent('#result');
}

/**
 * A stored script opened in a fresh browser: the source is exactly the stored
 * one, and Run, before any Save, calls it as the page's user (the browser
 * volunteers the credentials only below the page's own directory).
 */
async function freshBrowserRun(browser, problems) {
  await upload('whoami', WHOAMI);
  const anonymous = await (await fetch(`${base}/${bucket}/scripts/whoami`)).text();
  check(anonymous.startsWith('write: permission denied'), 'an anonymous run of whoami may not write (the check below means something)', anonymous);

  page = await newPage(browser, problems);
  await page.goto(`${base}/${bucket}/scripts/whoami/edit`);
  check(await page.inputValue('#source') === WHOAMI, 'the editor holds the stored source exactly, leading blank line included', await page.inputValue('#source'));
  const result = await run(page);
  check(result.includes('write: allowed'), 'Run in a fresh browser, before any Save, calls the script as the page\'s user', result);
  await page.context().close();
}

/** A page opened with ?key= (no Basic credentials at all) saves, and runs, with it. */
async function keyInQuery(browser, problems) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  context.setDefaultTimeout(15_000);
  page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`${base}/${bucket}/scripts/viakey/edit?key=${encodeURIComponent(secret)}`);
  await page.fill('#source', WHOAMI);
  const outcome = await save(page);
  check(outcome.status === 'Saved.', 'a page opened with ?key= saves with that key', outcome);
  check((await storedScripts()).includes('viakey'), 'the script saved through ?key= is stored', await storedScripts());
  const result = await run(page);
  check(result.includes('write: allowed'), 'a page opened with ?key= runs the script with that key (it ran anonymously)', result);
  await context.close();
}

async function main(browser, problems) {
  await freshBrowserRun(browser, problems);
  await keyInQuery(browser, problems);

  page = await newPage(browser, problems);
  // A new script: an empty editor.
  const first = await page.goto(editUrl);
  check(first && first.status() === 200, `GET ${editUrl} with the secret key is 200`, first && first.status());
  check((await page.title()).startsWith('hello'), 'the title names the script', await page.title());
  check(await page.inputValue('#source') === '', 'a new script opens an empty editor', await page.inputValue('#source'));

  // A syntax error: not saved, the error names the line.
  await page.click('#source');
  await page.keyboard.type(BROKEN);
  check(await page.inputValue('#source') === BROKEN, 'the typed source is in the editor', await page.inputValue('#source'));
  let outcome = await save(page);
  check(/^Not saved \(400\)/.test(outcome.status), '#status says Not saved (400)', outcome.status);
  check(/hello:2:/.test(outcome.error), '#error shows the Lua error naming line 2', outcome.error);
  check(!(await storedScripts()).includes('hello'), 'the broken script was not stored', await storedScripts());

  // The fix: saved.
  await page.fill('#source', FIXED);
  outcome = await save(page);
  check(outcome.status === 'Saved.', '#status says Saved.', outcome.status);
  check(outcome.error === '', '#error is cleared', outcome.error);
  check((await storedScripts()).includes('hello'), 'the fixed script is stored', await storedScripts());

  // A reload shows the stored source.
  await page.reload();
  check(await page.inputValue('#source') === FIXED, 'after a reload the editor holds the saved source', await page.inputValue('#source'));
  check(
    (await page.content()).includes('kvdb.escape_html(kvdb.var.name)'),
    'the source is in the page',
  );

  // Run it with GET and query vars.
  await page.selectOption('#method', 'GET');
  await page.fill('#vars', 'name=<b>World');
  let result = await run(page);
  check(/^200\b/.test(result), 'GET run: #result starts with status 200', result);
  check(result.includes('Hello &lt;b&gt;World'), 'GET run: #result shows Hello &lt;b&gt;World (escaped by the script)', result);
  check(/^content-type: /im.test(result), 'GET run: #result lists the response headers', result);

  // Run it with POST and a form body.
  await page.selectOption('#method', 'POST');
  await page.fill('#vars', '');
  await page.fill('#body', 'name=Form+%26+Body');
  result = await run(page);
  check(/^200\b/.test(result), 'POST form run: #result starts with status 200', result);
  check(result.includes('Hello Form &amp; Body'), 'POST form run: the form body reached kvdb.var', result);

  // And with a JSON body, the body winning over the query.
  await page.fill('#vars', 'name=query');
  await page.fill('#body', '{"name": "<i>Json"}');
  result = await run(page);
  check(/^200\b/.test(result), 'POST JSON run: #result starts with status 200', result);
  check(result.includes('Hello &lt;i&gt;Json'), 'POST JSON run: the JSON body reached kvdb.var', result);

  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`screenshot: ${SCREENSHOT}`);

  check(problems.length === 0, 'no page errors and no requests beyond the server', problems);
}

let browser;
let page;
let failed = false;
const problems = [];
try {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
    headless: true,
    timeout: 60_000,
  });
  await main(browser, problems);
  console.log('editor browser test: all checks passed');
} catch (e) {
  failed = true;
  const message = e instanceof CheckFailed ? e.message : e.stack || String(e);
  console.error(`FAIL: ${message}`);
  if (page) {
    try {
      mkdirSync(dirname(FAILURE_SCREENSHOT), { recursive: true });
      await page.screenshot({ path: FAILURE_SCREENSHOT, fullPage: true });
      console.error(`page at the failure: ${FAILURE_SCREENSHOT}`);
      console.error(`#status: ${await page.textContent('#status')}`);
      console.error(`#error: ${await page.textContent('#error')}`);
      console.error(`#result: ${await page.textContent('#result')}`);
    } catch {
      // The page itself is gone; the message above is all there is.
    }
  }
} finally {
  if (browser) await browser.close();
}
process.exit(failed ? 1 : 0);
