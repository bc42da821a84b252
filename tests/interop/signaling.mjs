// PROTOCOL.md Part 1 with the real npm socket.io-client 4.x, over each transport.
// Usage: node signaling.mjs http://127.0.0.1:PORT
// Prints one line per check and ends with "N passed, N failed"; exits non-zero on any failure.
import { io } from 'socket.io-client';
import assert from 'node:assert/strict';
import { check, finish, withQueuedMsgs } from './checks.mjs';

const BASE = process.argv[2];
if (!BASE) {
  console.error('usage: node signaling.mjs http://127.0.0.1:PORT');
  process.exit(2);
}
const TIMEOUT = 5000;
const open = new Set();

const TRANSPORTS = {
  websocket: { transports: ['websocket'] },
  polling: { transports: ['polling'], upgrade: false },
  upgrade: { transports: ['polling', 'websocket'] },
};

/** Connects; resolves once connected, with every `msg` queued for `next`. */
function connect(mode, userId, roomId, extra = {}) {
  const query = roomId === undefined ? { userId } : { userId, roomId };
  const socket = io(BASE, { ...TRANSPORTS[mode], query, forceNew: true, reconnection: false, ...extra });
  open.add(socket);
  const connected = withQueuedMsgs(socket, userId, TIMEOUT);
  socket.nextType = (type) => socket.next((m) => m && m.type === type);
  return connected;
}

const once = (socket, event) =>
  new Promise((resolve, reject) => {
    socket.once(event, (...args) => resolve(args));
    setTimeout(() => reject(new Error(`no ${event} within ${TIMEOUT} ms`)), TIMEOUT);
  });


const member = (userId, roomId) => JSON.stringify({ userId, roomId });

for (const mode of Object.keys(TRANSPORTS)) {
  const R = `room-${mode}`;
  const u = (n) => `${n}-${mode}`;

  await check(`${mode}: join envelope to the joiner and the room`, async () => {
    const alice = await connect(mode, u('alice'), R);
    assert.deepEqual(await alice.nextType('join'), {
      type: 'join', msg: `${u('alice')} join then room`, status: 200, data: { userId: u('alice'), roomId: R },
    });
    const bob = await connect(mode, u('bob'), R);
    const seen = await alice.nextType('join');
    assert.equal(JSON.stringify(seen), JSON.stringify({
      type: 'join', msg: `${u('bob')} join then room`, status: 200, data: { userId: u('bob'), roomId: R },
    }));
    await bob.nextType('join');
    if (mode === 'upgrade') {
      // The client starts on polling and moves to websocket.
      for (let i = 0; i < 50 && alice.io.engine.transport.name !== 'websocket'; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(alice.io.engine.transport.name, 'websocket');
    } else {
      assert.equal(alice.io.engine.transport.name, mode);
    }

    const list = { [u('alice')]: member(u('alice'), R), [u('bob')]: member(u('bob'), R) };
    const event = once(alice, 'roomUserList');
    const acked = await alice.timeout(TIMEOUT).emitWithAck('roomUserList', { roomId: R });
    assert.equal(JSON.stringify(acked), JSON.stringify(list));
    assert.equal(JSON.stringify((await event)[0]), JSON.stringify(list));

    const denied = await alice.timeout(TIMEOUT).emitWithAck('roomUserList', { roomId: 'not-mine' });
    assert.equal(denied.status, 403);
    assert.equal((await alice.nextType('error')).data.event, 'roomUserList');

    for (const [event, text] of [['call', '远程呼叫'], ['offer', 'rtc offer'], ['answer', 'rtc answer'], ['candidate', 'ice candidate']]) {
      alice.emit(event, { targetUid: u('bob'), sdp: { type: 'offer', sdp: 'v=0\r\n' }, n: 1.25 });
      const got = await bob.nextType(event);
      assert.equal(JSON.stringify(got), JSON.stringify({
        type: event, msg: text, status: 200,
        data: { targetUid: u('bob'), sdp: { type: 'offer', sdp: 'v=0\r\n' }, n: 1.25, fromUid: u('alice') },
      }));
    }
    alice.emit('call', { targetUid: 'nobody-home' });
    const missing = await alice.nextType('error');
    assert.equal(missing.status, 404);

    const big = { z: 'first', big: 'é'.repeat(250_000), tail: [1, 2.5, -3] }; // 500 kB of UTF-8
    alice.emit('msg', big);
    for (const s of [alice, bob]) {
      const got = await s.next((m) => m && m.z === 'first');
      assert.equal(JSON.stringify(got), JSON.stringify(big));
    }

    const bytes = Uint8Array.from({ length: 1024 }, (_, i) => (i * 7) & 0xff);
    alice.emit('msg', { kind: 'file', blob: bytes });
    const file = await bob.next((m) => m && m.kind === 'file');
    assert.ok(Buffer.isBuffer(file.blob), 'binary arrives as binary');
    assert.deepEqual(new Uint8Array(file.blob), bytes);

    alice.emit('msg', { huge: 'x'.repeat(1_100_000) });
    const tooLarge = await alice.nextType('error');
    assert.equal(tooLarge.status, 413);
    assert.ok(alice.connected, 'a refused message does not cost the connection');

    bob.disconnect();
    assert.deepEqual(await alice.nextType('leave'), {
      type: 'leave', msg: `${u('bob')} leave the room `, status: 200, data: { userId: u('bob'), roomId: R },
    });
    alice.disconnect();
  });

  await check(`${mode}: a second connection replaces the first`, async () => {
    const first = await connect(mode, u('dup'), R);
    const gone = once(first, 'disconnect');
    const second = await connect(mode, u('dup'), R);
    assert.deepEqual(await first.nextType('replaced'), {
      type: 'replaced', msg: 'signed in elsewhere', status: 409, data: null,
    });
    assert.equal((await gone)[0], 'io server disconnect');
    const list = await second.timeout(TIMEOUT).emitWithAck('roomUserList', { roomId: R });
    assert.deepEqual(Object.keys(list), [u('dup')]);
    second.disconnect();
  });

  await check(`${mode}: a refused handshake gets connect_error with the reason`, async () => {
    await assert.rejects(connect(mode, 'sfu', R), (e) => /reserved/.test(e.message));
    await assert.rejects(
      new Promise((resolve, reject) => {
        const s = io(BASE, { ...TRANSPORTS[mode], query: { roomId: R }, forceNew: true, reconnection: false });
        open.add(s);
        s.on('connect', resolve);
        s.on('connect_error', reject);
      }),
      (e) => /missing userId/.test(e.message),
    );
  });
}

for (const s of open) s.disconnect();
finish();
