// The kvdb.io JavaScript client (npm `kvdb.io`, pinned in package.json),
// unchanged, against a KVdb server: only its BASE_URL is pointed at us.
//
// usage: node kvdbio.cjs BASE_URL BUCKET SECRET_KEY READ_KEY WRITE_KEY OTHER_BUCKET
//   BUCKET: created with those three keys (nothing open to anonymous users)
//   OTHER_BUCKET: created without keys, for the Web Storage emulation
// Exits non-zero with the failed assertion; tests/e2e/clients.rs then checks
// over plain HTTP what the client left behind.
'use strict';

const assert = require('node:assert/strict');
const KVdb = require('kvdb.io');

const [base, id, secret, readKey, writeKey, otherId] = process.argv.slice(2);
if (!otherId) {
  console.error('usage: node kvdbio.cjs BASE_URL BUCKET SECRET_KEY READ_KEY WRITE_KEY OTHER_BUCKET');
  process.exit(2);
}
KVdb.BASE_URL = base;

// The client throws `Error("<status> - <status text>")` for an answer that is
// not 2xx (except on delete, which returns the body whatever the status).
async function refused(promise, status) {
  await assert.rejects(promise, (e) => e.message.startsWith(`${status} `), `expected ${status}`);
}

async function main() {
  const admin = KVdb.bucket(id, secret);

  // set / get / delete
  assert.equal(await admin.set('greeting', 'hello'), '');
  assert.equal(await admin.get('greeting'), 'hello');
  assert.equal(await admin.set('profile', JSON.stringify({ name: 'Ada' }), { type: 'application/json' }), '');
  assert.deepEqual(JSON.parse(await admin.get('profile')), { name: 'Ada' });
  await admin.set('doomed', 'x');
  await admin.delete('doomed');
  await refused(admin.get('doomed'), 404);

  // incr: integers, then a float, with the sign the client writes
  assert.equal(await admin.incr('visits', 1), '1');
  assert.equal(await admin.incr('visits', '41'), '42');
  assert.equal(await admin.incr('visits', -2), '40');
  // incr by 0 reads the counter (the client sends a bare `0`)
  assert.equal(await admin.incr('visits', 0), '40');
  assert.equal(await admin.incr('ratio', 1.01), '1.01');
  assert.equal(await admin.incr('ratio', -2), '-0.99');
  await refused(admin.incr('greeting', 1), 409);

  // many clients at once: no lost update
  await Promise.all(Array.from({ length: 50 }, () => admin.incr('concurrent', 1)));
  assert.equal(await admin.get('concurrent'), '50');

  // list (format=json): keys, key-value pairs with typed values, paging
  await admin.set('users:1:name', 'ada');
  await admin.set('users:2:name', 'bob');
  assert.deepEqual(await admin.list(), [
    'concurrent', 'greeting', 'profile', 'ratio', 'users:1:name', 'users:2:name', 'visits',
  ]);
  assert.deepEqual(await admin.list({ prefix: 'users:', values: true }), [
    ['users:1:name', 'ada'],
    ['users:2:name', 'bob'],
  ]);
  assert.deepEqual(await admin.list({ prefix: 'v', values: true }), [['visits', 40]]);
  assert.deepEqual(await admin.list({ skip: 1, limit: 2 }), ['greeting', 'profile']);
  assert.deepEqual(await admin.list({ reverse: true, limit: 2 }), ['visits', 'users:2:name']);

  // the bucket's own keys: read_key reads, write_key writes (and reads)
  const reader = KVdb.bucket(id, readKey);
  assert.equal(await reader.get('greeting'), 'hello');
  await refused(reader.set('greeting', 'no'), 403);
  const writer = KVdb.bucket(id, writeKey);
  assert.equal(await writer.set('greeting', 'hi'), '');
  assert.equal(await writer.get('greeting'), 'hi');

  // no, a wrong or a foreign credential; an unknown bucket
  await refused(KVdb.bucket(id).get('greeting'), 401);
  await refused(KVdb.bucket(id, 'not-the-key').get('greeting'), 401);
  await refused(KVdb.bucket(otherId, secret).accessToken(), 401);
  await refused(KVdb.bucket('NoSuchBucket0000000000', secret).get('greeting'), 404);

  // access tokens: confined to their prefix and their permissions
  const token = await admin.accessToken({
    prefix: 'users:1:', ttl: 3600, permissions: ['read', 'write', 'enumerate'],
  });
  assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  const user = KVdb.bucket(id, token);
  assert.equal(await user.set('users:1:flavor', 'oatmeal'), '');
  assert.equal(await user.get('users:1:flavor'), 'oatmeal');
  assert.equal(await user.incr('users:1:profile_views', 1), '1');
  assert.deepEqual(await user.list({ prefix: 'users:1:', values: true }), [
    ['users:1:flavor', 'oatmeal'],
    ['users:1:name', 'ada'],
    ['users:1:profile_views', 1],
  ]);
  // listing outside the prefix shows only the token's keys
  assert.deepEqual(await user.list(), ['users:1:flavor', 'users:1:name', 'users:1:profile_views']);
  await refused(user.get('users:2:name'), 403);
  await refused(user.set('users:2:name', 'mallory'), 403);
  await refused(user.accessToken(), 403);

  const readOnly = KVdb.bucket(id, await admin.accessToken({ prefix: 'users:1:' }));
  assert.equal(await readOnly.get('users:1:flavor'), 'oatmeal');
  await refused(readOnly.set('users:1:flavor', 'mud'), 403);
  await refused(readOnly.list(), 403);

  // the Web Storage emulation, on a bucket without keys
  const storage = KVdb.bucket(otherId).localStorage();
  await storage.setItem('a', '1');
  await storage.setItem('b', '2');
  assert.equal(await storage.getItem('a'), '1');
  assert.equal(await storage.getItem('missing'), null);
  assert.equal(await storage.length(), 2);
  assert.deepEqual(await storage.key(1), ['b']);
  await storage.removeItem('a');
  assert.equal(await storage.length(), 1);
  await storage.clear();
  assert.equal(await storage.length(), 0);
  await storage.setItem('kept', 'yes');
}

main().then(
  () => console.log('kvdb.io client: every check passed'),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
