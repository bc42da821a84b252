// Access tokens with the real npm socket.io-client 4.x (tests/auth.rs runs this).
// Usage: node auth.mjs keypair DIR                    (writes DIR/public.pem and DIR/private.pem)
//        node auth.mjs check URL TOKENS.json DIR      (the server has DIR/public.pem)
// Prints one line per check and ends with "N passed, N failed"; exits non-zero on any failure.
import { io } from 'socket.io-client';
import assert from 'node:assert/strict';
import { check, finish, withQueuedMsgs } from './checks.mjs';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const [mode, ...args] = process.argv.slice(2);
const rsaPair = () =>
  crypto.generateKeyPairSync('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });

if (mode === 'keypair') {
  const { publicKey, privateKey } = rsaPair();
  fs.writeFileSync(path.join(args[0], 'public.pem'), publicKey);
  fs.writeFileSync(path.join(args[0], 'private.pem'), privateKey);
  process.exit(0);
}
if (mode !== 'check' || args.length !== 3) {
  console.error('usage: node auth.mjs keypair DIR | check URL TOKENS.json DIR');
  process.exit(2);
}
const [BASE, tokensFile, keyDir] = args;
const tokens = JSON.parse(fs.readFileSync(tokensFile, 'utf8'));
const TIMEOUT = 5000;
const open = new Set();

/** An RS256 token as another service would mint it. */
function rs256(claims, privateKey) {
  const b64 = (x) => Buffer.from(x).toString('base64url');
  const body = `${b64(JSON.stringify({ alg: 'RS256', typ: 'JWT' }))}.${b64(JSON.stringify(claims))}`;
  return `${body}.${b64(crypto.sign('RSA-SHA256', Buffer.from(body), privateKey))}`;
}
const inAnHour = () => Math.floor(Date.now() / 1000) + 3600;

/** Connects; resolves once connected (with `msg`s queued for `nextType`), rejects on connect_error. */
function connect(userId, roomId, { token, auth, transports = ['websocket'] } = {}) {
  const query = token === undefined ? { userId, roomId } : { userId, roomId, token };
  const socket = io(BASE, { transports, query, auth, forceNew: true, reconnection: false });
  open.add(socket);
  const connected = withQueuedMsgs(socket, userId, TIMEOUT);
  socket.nextType = (type, match = () => true) => socket.next((m) => m && m.type === type && match(m));
  return connected;
}

/** The connect_error message a handshake gets (fails if it connects). */
async function refusal(userId, roomId, options) {
  try {
    await connect(userId, roomId, options);
  } catch (e) {
    return e.message;
  }
  throw new Error(`${userId} connected`);
}


let alice;
let bob;
await check('no token: refused, saying a token is required', async () => {
  assert.match(await refusal('alice', 'r1', {}), /a token is required/);
});
await check('a valid token in the query joins (websocket)', async () => {
  alice = await connect('alice', 'r1', { token: tokens.alice });
  await alice.nextType('join', (m) => m.data.userId === 'alice');
});
await check('a valid token in the auth payload joins (polling)', async () => {
  bob = await connect('bob', 'r1', { auth: { token: tokens.bob }, transports: ['polling'] });
  await alice.nextType('join', (m) => m.data.userId === 'bob');
});
await check('an expired token: refused as expired', async () => {
  assert.match(await refusal('alice', 'r1', { token: tokens.expired }), /expired/);
});
await check('a token signed with another key: refused for its signature', async () => {
  assert.match(await refusal('alice', 'r1', { token: tokens.wrongKey }), /signature/);
});
await check("someone else's token: refused, naming the user", async () => {
  assert.match(await refusal('mallory', 'r1', { token: tokens.alice }), /for user "alice", not "mallory"/);
});
await check('a token for another room: refused, naming the room', async () => {
  assert.match(await refusal('alice', 'r2', { token: tokens.alice }), /for room "r1", not room "r2"/);
});
await check("RS256 from another service's key joins; from a stranger's key it does not", async () => {
  const privateKey = fs.readFileSync(path.join(keyDir, 'private.pem'), 'utf8');
  const erin = await connect('erin', 'r1', { token: rs256({ sub: 'erin', room: 'r1', exp: inAnHour() }, privateKey) });
  await erin.nextType('join', (m) => m.data.userId === 'erin');
  erin.disconnect();
  const stranger = rsaPair().privateKey;
  const forged = rs256({ sub: 'erin', room: 'r1', exp: inAnHour() }, stranger);
  assert.match(await refusal('erin', 'r1', { token: forged }), /signature/);
});
await check('without the publish grant a publisher offer gets 403', async () => {
  const viewer = await connect('viewer', 'r1', { token: tokens.viewer });
  const sdp = 'v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n';
  viewer.emit('offer', { targetUid: 'sfu', sdp: { type: 'offer', sdp } });
  const refused = await viewer.nextType('error');
  assert.equal(refused.status, 403);
  assert.match(refused.msg, /does not grant publish/);
  // Alice may publish: the same offer is judged on its SDP instead.
  alice.emit('offer', { targetUid: 'sfu', sdp: { type: 'offer', sdp } });
  const judged = await alice.nextType('error');
  assert.equal(judged.status, 400, JSON.stringify(judged));
  viewer.disconnect();
});
await check('calls reach members of the own room only', async () => {
  const carol = await connect('carol', 'r2', { token: tokens.carol });
  alice.emit('call', { targetUid: 'carol' });
  const refused = await alice.nextType('error');
  assert.equal(refused.status, 403);
  assert.match(refused.msg, /not in your room/);
  alice.emit('call', { targetUid: 'bob' });
  const call = await bob.nextType('call');
  assert.equal(call.data.fromUid, 'alice');
  carol.disconnect();
});
await check('a token printed by `switchboard token` joins', async () => {
  const dave = await connect('dave', 'r1', { token: tokens.cli });
  await dave.nextType('join', (m) => m.data.userId === 'dave');
  dave.disconnect();
});
await check('the API: the record grant starts its own room only', async () => {
  const post = (token, roomId) =>
    fetch(`${BASE}/api/recordings/start`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ roomId }),
    });
  const ok = await post(tokens.recorder, 'r1');
    const body = await ok.text();
  assert.equal(ok.status, 200, body);
  assert.equal(JSON.parse(body).recording, true);
  assert.equal((await post(tokens.recorder, 'r2')).status, 403);
  assert.equal((await post(tokens.alice, 'r1')).status, 403);
  assert.equal((await post('garbage', 'r1')).status, 401);
});

for (const s of open) s.disconnect();
finish();
