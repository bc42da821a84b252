// End to end in headless Chromium: three users open the demo page with fake camera and
// microphone; each must decode and show video from both others (the fake camera's green picture),
// hear both (decoded audio energy), and get both others' chat messages; channel reliability
// settings, simulcast layer switches and connection set-up times are checked too.
// Run it inside a network namespace with only loopback (tests/browser.rs does:
//   unshare -n sh -c 'ip link set lo up && exec node browser.mjs SERVER_BINARY').
// Prints one line per check and "N passed, N failed"; exits non-zero on failure.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
    LOUD, WAIT_MS, chat, checker, decoded, gotChat, heard, launchChromium, pollPages, shows, sleep, startServer,
  stopProcess, tilesSeen, waitVideo,
} from './meeting.mjs';

const server = process.argv[2];
const USERS = ['ada', 'bea', 'cyd'];
const counts = checker();
const { check } = counts;

// The server, on loopback only, printing "listening on http://ADDR" first.
// Room "rec" is recorded, one WebM per participant.
const recordDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-recordings-'));
const { srv, base } = await startServer(server, ['--media-ip', '127.0.0.1', '--record-dir', recordDir], {
  SWITCHBOARD_RECORDING__ROOMS: '["rec"]',
  SWITCHBOARD_RECORDING__MODE: 'participants',
});

let browser;
try {
  browser = await launchChromium();
  const { context } = browser;
  const pages = [];
  for (const user of USERS) {
    const page = await context.newPage();
    page.on('console', (m) => m.type() === 'error' && console.log(`[${user} console] ${m.text()}`));
    await page.goto(`${base}/?room=e2e&name=${user}`);
    pages.push(page);
    await sleep(300);
  }

  // Video: framesDecoded > 0 on one inbound video stream per other member.
  const others = (u) => USERS.filter((x) => x !== u);
  const frames = await pollPages(pages, decoded, (f) => f.every((f, i) => others(USERS[i]).every((u) => (f[u] || 0) > 0)));
  USERS.forEach((u, i) => {
    check(`${u} decodes video from ${others(u).join(' and ')}`, others(u).every((o) => (frames[i][o] || 0) > 0), frames[i]);
  });

  // ...and shows it: each other member's tile plays, and its picture is the publisher's (Chromium's
  // fake camera paints a green frame; a tile that never starts, or shows garbage, fails here).
  for (let i = 0; i < pages.length; i++) {
    const shown = await shows(pages[i], others(USERS[i]));
    check(`${USERS[i]} shows the video of ${others(USERS[i]).join(' and ')}`, shown, await pages[i].evaluate(tilesSeen));
  }

  // Audio: each other member's microphone is heard (Chromium's fake microphone beeps, so the
  // decoded audio has energy; silence or concealment alone would not).
  const energy = await pollPages(pages, heard, (e) => e.every((e, i) => others(USERS[i]).every((u) => (e[u] || 0) > LOUD)));
  USERS.forEach((u, i) => {
    check(`${u} hears ${others(u).join(' and ')}`, others(u).every((o) => (energy[i][o] || 0) > LOUD), energy[i]);
  });

  if (process.env.SCREENSHOT) await pages[0].screenshot({ path: process.env.SCREENSHOT });

  // Chat over the data channels.
  for (let i = 0; i < pages.length; i++) await chat(pages[i], `hi from ${USERS[i]} ✓`);
  for (let i = 0; i < pages.length; i++) {
    const got = await gotChat(pages[i], others(USERS[i]), (o) => `hi from ${o} ✓`);
    check(`${USERS[i]} gets the chat of ${others(USERS[i]).join(' and ')}`, got, await pages[i].evaluate(() => window.sb.chatLog));
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
  const first = await waitVideo(ada, 'dee', (v) => v.frames > 0 && v.width > 0);
  check('ada decodes dee\'s simulcast video', first.ok, first.v);
  if (first.ok) {
    const setQuality = (quality) => ada.evaluate(([trackId, quality]) => window.sb.io.emit('setQuality', { trackId, quality }), [first.v.id, quality]);
    await setQuality('low');
    const low = await waitVideo(ada, 'dee', (v) => v.width > 0 && v.width <= 160);
    check('setQuality low switches dee to the low layer', low.ok, low.v);
    await setQuality('high');
    // High: the best layer dee is sending (under load Chrome may pause its full layer, then
    // the server forwards the next one down).
    const high = await waitVideo(ada, 'dee', (v) => v.width > 160);
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
  const eveSees = await shows(eve, [...USERS, 'dee']);
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
  // machine (the target of 300 ms is measured with `switchboard load`, not here). The shared
  // machine makes it noisy: one connection at 313 ms seen in CI, and on a busy day medians of
  // 211-215 ms and once 429 ms. The regressions this guards against (ICE-lite on the server,
  // webrtc's acceptance wait before nominating) cost 1.6-1.7 s on every affected connection, so
  // each must be under a second and the median of the six under 800 ms.
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
        check('connections are up within 800 ms (median of the six)', median < 800, { medianMs: Math.round(median), all: setUpMs.map(Math.round) });

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
  if (browser) await browser.close();
  fs.rmSync(recordDir, { recursive: true, force: true });
    await stopProcess(srv);
}
console.log(`${counts.passed} passed, ${counts.failed} failed`);
process.exit(counts.failed ? 1 : 0);
