// End to end in headless Chromium: three users open the demo page with fake camera and
// microphone; each must decode and show video from both others (the fake camera's green picture),
// hear both (decoded audio energy), and get both others' chat messages; channel reliability
// settings, simulcast layer switches and connection set-up times are checked too.
// Run it inside a network namespace with only loopback (tests/browser.rs does:
//   unshare -n sh -c 'ip link set lo up && exec node browser.mjs SERVER_BINARY').
// Prints one line per check and "N passed, N failed"; exits non-zero on failure.
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const server = process.argv[2];
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const USERS = ['ada', 'bea', 'cyd'];
const WAIT_MS = 30_000;
let passed = 0;
let failed = 0;
const check = (name, ok, detail) => {
  ok ? passed++ : failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail === undefined ? '' : ' ' + JSON.stringify(detail)}`);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The server, on loopback only, printing "listening on http://ADDR" first.
// Room "rec" is recorded, one WebM per participant.
const recordDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-recordings-'));
const srv = spawn(server, ['--listen', '127.0.0.1:0', '--media-ip', '127.0.0.1', '--record-dir', recordDir], {
  stdio: ['ignore', 'pipe', 'pipe'],
  env: {
    ...process.env,
    RUST_LOG: process.env.SERVER_LOG || 'warn',
    SWITCHBOARD_RECORDING__ROOMS: '["rec"]',
    SWITCHBOARD_RECORDING__MODE: 'participants',
  },
});
srv.stderr.on('data', (d) => process.env.SERVER_LOG && process.stderr.write('[server] ' + d));
const base = await new Promise((resolve, reject) => {
  let out = '';
  srv.stdout.on('data', (d) => {
    out += d;
    const m = out.match(/listening on (http:\/\/\S+)/);
    if (m) resolve(m[1]);
  });
  srv.on('exit', (code) => reject(new Error('server exited ' + code)));
});

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--disable-features=WebRtcHideLocalIpsWithMdns',
      '--autoplay-policy=no-user-gesture-required',
    ],
  });
  const pages = [];
  for (const user of USERS) {
    const page = await context.newPage();
    page.on('console', (m) => m.type() === 'error' && console.log(`[${user} console] ${m.text()}`));
    await page.goto(`${base}/?room=e2e&name=${user}`);
    pages.push(page);
    await sleep(300);
  }

  // Video: framesDecoded > 0 on one inbound video stream per other member.
  const decoded = (page) =>
    page.evaluate(async () => {
      if (!window.sb.sub) return {};
      const byTrack = {};
      (await window.sb.sub.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') byTrack[s.trackIdentifier] = s.framesDecoded || 0;
      });
      // Map track ids to the publisher (stream id) that sent them.
      const owners = {};
      for (const [user, t] of window.sb.tiles) for (const tr of t.stream.getVideoTracks()) owners[tr.id] = user;
      const out = {};
      for (const [track, frames] of Object.entries(byTrack)) if (owners[track]) out[owners[track]] = frames;
      return out;
    });
  const deadline = Date.now() + WAIT_MS;
  let frames = [];
  while (Date.now() < deadline) {
    frames = await Promise.all(pages.map(decoded));
    const done = frames.every((f, i) => USERS.filter((u) => u !== USERS[i]).every((u) => (f[u] || 0) > 0));
    if (done) break;
    await sleep(250);
  }
  USERS.forEach((u, i) => {
    const others = USERS.filter((x) => x !== u);
    check(`${u} decodes video from ${others.join(' and ')}`, others.every((o) => (frames[i][o] || 0) > 0), frames[i]);
  });

  // ...and shows it: each other member's tile plays, and its picture is the publisher's (Chromium's
  // fake camera paints a green frame; a tile that never starts, or shows garbage, fails here).
  const tilesSeen = () => [...window.sb.tiles].filter(([u]) => u !== window.sb.me).map(([u, t]) => {
    const c = document.createElement('canvas'); c.width = 64; c.height = 48;
    const g = c.getContext('2d'); g.drawImage(t.video, 0, 0, 64, 48);
    const d = g.getImageData(0, 0, 64, 48).data; const rgb = [0, 0, 0];
    for (let k = 0; k < d.length; k += 4) for (let j = 0; j < 3; j++) rgb[j] += d[k + j] / (d.length / 4);
    const green = rgb[1] > 100 && rgb[0] < 60 && rgb[2] < 60;
    return { u, playing: t.video.videoWidth > 0 && !t.video.paused && t.video.currentTime > 0, green, rgb: rgb.map(Math.round) };
  });
  for (let i = 0; i < pages.length; i++) {
    const others = USERS.filter((u) => u !== USERS[i]);
    const shown = await pages[i]
      .waitForFunction(([others, seen]) => {
        const tiles = (0, eval)(seen)();
        return others.every((o) => tiles.some((t) => t.u === o && t.playing && t.green));
      }, [others, `(${tilesSeen})`], { timeout: WAIT_MS })
      .then(() => true, () => false);
    check(`${USERS[i]} shows the video of ${others.join(' and ')}`, shown, await pages[i].evaluate(tilesSeen));
  }

  // Audio: each other member's microphone is heard (Chromium's fake microphone beeps, so the
  // decoded audio has energy; silence or concealment alone would not).
  const heard = (page) =>
    page.evaluate(async () => {
      const owners = {};
      for (const [user, t] of window.sb.tiles) for (const tr of t.stream.getAudioTracks()) owners[tr.id] = user;
      const out = {};
      (await window.sb.sub.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'audio' && owners[s.trackIdentifier]) out[owners[s.trackIdentifier]] = s.totalAudioEnergy || 0;
      });
      return out;
    });
  const LOUD = 0.01; // totalAudioEnergy after a beep or two; a silent stream stays near 0
  let energy = [];
  for (const until = Date.now() + WAIT_MS; Date.now() < until; await sleep(250)) {
    energy = await Promise.all(pages.map(heard));
    if (energy.every((e, i) => USERS.filter((u) => u !== USERS[i]).every((u) => (e[u] || 0) > LOUD))) break;
  }
  USERS.forEach((u, i) => {
    const others = USERS.filter((x) => x !== u);
    check(`${u} hears ${others.join(' and ')}`, others.every((o) => (energy[i][o] || 0) > LOUD), energy[i]);
  });

  if (process.env.SCREENSHOT) await pages[0].screenshot({ path: process.env.SCREENSHOT });

  // Chat over the data channels.
  for (let i = 0; i < pages.length; i++) {
    await pages[i].waitForFunction(() => window.sb.chat && window.sb.chat.readyState === 'open', null, { timeout: WAIT_MS });
    await pages[i].evaluate((text) => {
      document.getElementById('text').value = text;
      document.getElementById('chat').requestSubmit();
    }, `hi from ${USERS[i]} ✓`);
  }
  for (let i = 0; i < pages.length; i++) {
    const others = USERS.filter((u) => u !== USERS[i]);
    const got = await pages[i]
      .waitForFunction(
        (others) => others.every((o) => window.sb.chatLog.some((l) => l.from === o && l.text === `hi from ${o} ✓`)),
        others,
        { timeout: WAIT_MS },
      )
      .then(() => true, () => false);
    check(`${USERS[i]} gets the chat of ${others.join(' and ')}`, got, await pages[i].evaluate(() => window.sb.chatLog));
  }

  // Partially reliable channels keep their settings through the server, as Chromium reads them
  // from the DATA_CHANNEL_OPEN the server sends.
  await pages[0].evaluate(() => {
    window.sb.pub.createDataChannel('cursor', { ordered: false, maxPacketLifeTime: 200 });
    window.sb.pub.createDataChannel('lossy', { maxRetransmits: 0 });
  });
  for (let i = 1; i < pages.length; i++) {
    const got = await pages[i]
      .waitForFunction(() => {
        const c = window.sb.channelsIn;
        const ok = (label, want) => c.some((x) => x.label === label && x.from === 'ada' && Object.keys(want).every((k) => x[k] === want[k]));
        return ok('cursor', { ordered: false, maxPacketLifeTime: 200, maxRetransmits: null })
          && ok('lossy', { ordered: true, maxRetransmits: 0, maxPacketLifeTime: null });
      }, null, { timeout: WAIT_MS })
      .then(() => true, () => false);
    check(`${USERS[i]} gets ada's partially reliable channels with their settings`, got, await pages[i].evaluate(() => window.sb.channelsIn));
  }

  // Simulcast: dee publishes q/h/f layers; ada switches dee's video between low and high.
  const dee = await context.newPage();
  await dee.goto(`${base}/?room=e2e&name=dee&simulcast=1`);
  const ada = pages[0];
  const deeVideo = () =>
    ada.evaluate(async () => {
      const t = window.sb.tiles.get('dee');
      const track = t && t.stream.getVideoTracks()[0];
      if (!track || !window.sb.sub) return null;
      let width = 0;
      let frames = 0;
      (await window.sb.sub.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.trackIdentifier === track.id) {
          width = s.frameWidth || 0;
          frames = s.framesDecoded || 0;
        }
      });
      return { id: track.id, width, frames };
    });
  const waitVideo = async (ok) => {
    const end = Date.now() + WAIT_MS;
    let v = null;
    while (Date.now() < end) {
      v = await deeVideo();
      if (v && ok(v)) return { ok: true, v };
      await sleep(250);
    }
    return { ok: false, v };
  };
  const first = await waitVideo((v) => v.frames > 0 && v.width > 0);
  check('ada decodes dee\'s simulcast video', first.ok, first.v);
  if (first.ok) {
    const setQuality = (quality) => ada.evaluate(([trackId, quality]) => window.sb.io.emit('setQuality', { trackId, quality }), [first.v.id, quality]);
    await setQuality('low');
    const low = await waitVideo((v) => v.width > 0 && v.width <= 160);
    check('setQuality low switches dee to the low layer', low.ok, low.v);
    await setQuality('high');
    // High: the best layer dee is sending (under load Chrome may pause its full layer, then
    // the server forwards the next one down).
    const high = await waitVideo((v) => v.width > 160);
    // What dee sends per layer, and its bandwidth estimate: says whether a failure is Chrome
    // pausing layers or the server not switching.
    const deeLayers = await dee.evaluate(async () => {
      const out = [];
      let estimate = null;
      (await window.sb.pub.getStats()).forEach((s) => {
        if (s.type === 'outbound-rtp' && s.kind === 'video') {
          out.push({ rid: s.rid, width: s.frameWidth || 0, frames: s.framesSent || 0, limit: s.qualityLimitationReason, active: s.active });
        }
        if (s.type === 'candidate-pair' && s.nominated) estimate = s.availableOutgoingBitrate;
      });
      return { estimate, out };
    });
    check('setQuality high switches dee back up', high.ok, { ...high.v, deeSends: deeLayers });
  }

  // A viewer without camera or microphone: its publisher connection carries only the chat
  // channel, and it still sees everyone.
  const eve = await context.newPage();
  await eve.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('denied', 'NotAllowedError'));
  });
  await eve.goto(`${base}/?room=e2e&name=eve`);
  const eveSees = await eve
    .waitForFunction(([others, seen]) => {
      const tiles = (0, eval)(seen)();
      return others.every((o) => tiles.some((t) => t.u === o && t.playing && t.green));
    }, [[...USERS, 'dee'], `(${tilesSeen})`], { timeout: WAIT_MS })
    .then(() => true, () => false);
  check('a viewer without camera or microphone sees everyone', eveSees, await eve.evaluate(tilesSeen));

  // SRTP: Chromium lists AES_CM_128_HMAC_SHA1_80 first, but the server's preference decides
  // (vendor/rtc-dtls patch), so both of ada's connections use AEAD_AES_128_GCM.
  const ciphers = await pages[0].evaluate(async () => {
    const cipher = async (pc) => {
      let c = null;
      (await pc.getStats()).forEach((s) => { if (s.type === 'transport' && s.srtpCipher) c = s.srtpCipher; });
      return c;
    };
    return { publisher: await cipher(window.sb.pub), subscriber: await cipher(window.sb.sub) };
  });
  check('media is protected with AEAD_AES_128_GCM', ciphers.publisher === 'SRTP_AEAD_AES_128_GCM' && ciphers.subscriber === 'SRTP_AEAD_AES_128_GCM', ciphers);

  // Connection set-up, from the browser's offer or answer to `connected`: 70-140 ms on an idle
  // machine, and the target is 300 ms. One connection can take longer when the shared machine is
  // busy (313 ms seen once in CI), so the target applies to the median of the six; each one must
  // still be well under a second: the regressions this guards against (ICE-lite on the server,
  // webrtc's acceptance wait before nominating) cost 1.6-1.7 s on every affected connection.
  const setUpMs = [];
  for (let i = 0; i < pages.length; i++) {
    const t = await pages[i].evaluate(() => window.sb.timings);
    const pubMs = t.publisherConnected - t.publisherOffer;
    const subMs = t.subscriberConnected - t.subscriberAnswer;
    console.log(`timing ${USERS[i]}: publisher connected ${pubMs.toFixed(0)} ms after its offer, subscriber ${subMs.toFixed(0)} ms after its answer`);
    check(`${USERS[i]} connections are up well within a second`, pubMs < 1000 && subMs < 1000, { pubMs: Math.round(pubMs), subMs: Math.round(subMs) });
    setUpMs.push(pubMs, subMs);
  }
  const sorted = [...setUpMs].sort((a, b) => a - b);
  const median = (sorted[2] + sorted[3]) / 2;
    check('connections are up within 300 ms (median of the six)', median < 300, { medianMs: Math.round(median), all: setUpMs.map(Math.round) });

  // Recording: rita publishes camera and microphone in the recorded room for a few seconds and
  // leaves; her WebM holds one Opus and one VP8 stream of about that long, starting together.
  const rita = await context.newPage();
  await rita.goto(`${base}/?room=rec&name=rita`);
  const up = await rita.waitForFunction(() => window.sb.timings.publisherConnected, null, { timeout: WAIT_MS }).then(() => true, () => false);
  const publishedAt = Date.now();
  await sleep(4000);
  await rita.close();
  const publishedMs = Date.now() - publishedAt;
  const roomDir = path.join(recordDir, 'rec');
  let webm = null;
  for (const end = Date.now() + WAIT_MS; Date.now() < end && !webm; await sleep(200)) {
    const names = fs.existsSync(roomDir) ? fs.readdirSync(roomDir) : [];
    webm = names.find((n) => n.startsWith('rita-av-') && n.endsWith('.webm'));
  }
  check('a recorded participant gets one WebM file', up && !!webm, { up, files: fs.existsSync(roomDir) ? fs.readdirSync(roomDir) : [] });
  if (webm) {
    const file = path.join(roomDir, webm);
    const { execFileSync } = await import('node:child_process');
    const probe = JSON.parse(execFileSync('ffprobe', ['-v', 'error', '-show_entries', 'stream=codec_name,start_time:format=duration', '-of', 'json', file]));
    const streams = probe.streams.map((s) => ({ codec: s.codec_name, start: Number(s.start_time) }));
    const duration = Number(probe.format.duration);
    const codecs = streams.map((s) => s.codec).sort().join(',');
    const apart = streams.length === 2 ? Math.abs(streams[0].start - streams[1].start) : Infinity;
    check('it holds one audio and one video stream, starting together (within 100 ms)', codecs === 'opus,vp8' && apart <= 0.1, { streams, apart });
    check('it lasts as long as rita published', Math.abs(duration - publishedMs / 1000) <= Math.max(0.7, publishedMs / 1000 * 0.2), { duration, publishedMs });
    let errors = '';
    try {
      execFileSync('ffmpeg', ['-v', 'error', '-i', file, '-f', 'null', '-'], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      errors = String(e.stderr || e);
    }
    check('it decodes without an error', errors === '', errors.slice(0, 500));
  }
} catch (e) {
  check('no exception', false, String(e && e.stack || e));
} finally {
  if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  fs.rmSync(recordDir, { recursive: true, force: true });
  srv.kill('SIGTERM');
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
