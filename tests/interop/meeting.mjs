// What the Chromium end-to-end scripts share: starting a server binary, launching Chromium
// with fake camera and microphone, and reading from a demo page what it decodes, shows and
// hears, per publisher.
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const WAIT_MS = 30_000;
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Counts checks; prints one line per check.
export function checker() {
  const c = { passed: 0, failed: 0 };
  c.check = (name, ok, detail) => {
    ok ? c.passed++ : c.failed++;
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail === undefined ? '' : ' ' + JSON.stringify(detail)}`);
  };
  return c;
}

// Stops a child process and waits for it to be gone (SIGKILL after 5 s), so that nothing it
// still does weighs on what runs next.
export async function stopProcess(child, signal = 'SIGTERM') {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((resolve) => child.once('exit', resolve));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}

// A server binary on loopback; resolves with the process and its base URL once it prints
// "listening on http://ADDR".
export async function startServer(binary, args, env, tag = 'server') {
  const srv = spawn(binary, ['--listen', '127.0.0.1:0', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.SERVER_LOG || 'warn', ...env },
  });
  srv.stderr.on('data', (d) => process.env.SERVER_LOG && process.stderr.write(`[${tag}] ` + d));
  const base = await new Promise((resolve, reject) => {
    let out = '';
    srv.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    srv.on('exit', (code) => reject(new Error(`${tag} exited ${code}`)));
  });
  return { srv, base };
}

export async function launchChromium() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--disable-features=WebRtcHideLocalIpsWithMdns',
      '--autoplay-policy=no-user-gesture-required',
    ],
  });
  const close = async () => {
    await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  };
  return { context, close };
}

// Frames decoded per publisher (by the stream id its tracks arrive with).
export const decoded = (page) =>
  page.evaluate(async () => {
    if (!window.sb.sub) return {};
    const byTrack = {};
    (await window.sb.sub.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') byTrack[s.trackIdentifier] = s.framesDecoded || 0;
    });
    const owners = {};
    for (const [user, t] of window.sb.tiles) for (const tr of t.stream.getVideoTracks()) owners[tr.id] = user;
    const out = {};
    for (const [track, frames] of Object.entries(byTrack)) if (owners[track]) out[owners[track]] = frames;
    return out;
  });

// Evaluated in the page: each other member's tile, whether it plays, and whether its picture
// is the fake camera's green.
export const tilesSeen = () => [...window.sb.tiles].filter(([u]) => u !== window.sb.me).map(([u, t]) => {
  const c = document.createElement('canvas'); c.width = 64; c.height = 48;
  const g = c.getContext('2d'); g.drawImage(t.video, 0, 0, 64, 48);
  const d = g.getImageData(0, 0, 64, 48).data; const rgb = [0, 0, 0];
  for (let k = 0; k < d.length; k += 4) for (let j = 0; j < 3; j++) rgb[j] += d[k + j] / (d.length / 4);
  const green = rgb[1] > 100 && rgb[0] < 60 && rgb[2] < 60;
  return { u, playing: t.video.videoWidth > 0 && !t.video.paused && t.video.currentTime > 0, green, rgb: rgb.map(Math.round) };
});

// Whether the page shows every one of `others` playing the green picture (within WAIT_MS).
export const shows = (page, others) =>
  page
    .waitForFunction(([others, seen]) => {
      const tiles = (0, eval)(seen)();
      return others.every((o) => tiles.some((t) => t.u === o && t.playing && t.green));
    }, [others, `(${tilesSeen})`], { timeout: WAIT_MS })
    .then(() => true, () => false);

// Decoded audio energy per publisher (the fake microphone beeps; silence stays near 0).
export const heard = (page) =>
  page.evaluate(async () => {
    const owners = {};
    for (const [user, t] of window.sb.tiles) for (const tr of t.stream.getAudioTracks()) owners[tr.id] = user;
    const out = {};
    (await window.sb.sub.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio' && owners[s.trackIdentifier]) out[owners[s.trackIdentifier]] = s.totalAudioEnergy || 0;
    });
    return out;
  });
export const LOUD = 0.01;

// Polls `read` on every page until `done(values)` or WAIT_MS; returns the last values.
export async function pollPages(pages, read, done) {
  let values = [];
  for (const until = Date.now() + WAIT_MS; Date.now() < until; await sleep(250)) {
    values = await Promise.all(pages.map(read));
    if (done(values)) break;
  }
  return values;
}

// Sends a chat line from the page's demo form.
export async function chat(page, text) {
  await page.waitForFunction(() => window.sb.chat && window.sb.chat.readyState === 'open', null, { timeout: WAIT_MS });
  await page.evaluate((text) => {
    document.getElementById('text').value = text;
    document.getElementById('chat').requestSubmit();
  }, text);
}

// Whether the page got `text(o)` from each of `others` on the chat channel.
export const gotChat = (page, others, text) =>
  page
    .waitForFunction(
      ([others, texts]) => others.every((o, i) => window.sb.chatLog.some((l) => l.from === o && l.text === texts[i])),
      [others, others.map(text)],
      { timeout: WAIT_MS },
    )
    .then(() => true, () => false);

// The width and frames decoded of `publisher`'s video on the page (null until it arrives).
export const videoOf = (page, publisher) =>
  page.evaluate(async (publisher) => {
    const t = window.sb.tiles.get(publisher);
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
  }, publisher);

// Polls `videoOf` until `ok(v)` or WAIT_MS.
export async function waitVideo(page, publisher, ok) {
  const end = Date.now() + WAIT_MS;
  let v = null;
  while (Date.now() < end) {
    v = await videoOf(page, publisher);
    if (v && ok(v)) return { ok: true, v };
    await sleep(250);
  }
  return { ok: false, v };
}
