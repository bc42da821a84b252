// End to end in headless Chromium, one room across two nodes: a Redis server and two
// switchboard nodes on it (media on 127.0.0.2 and 127.0.0.3), and four users of the demo page
// alternately on each node. Each must decode, show and hear the three others and get their
// chat; a simulcast publisher's layers are chosen from the other node.
// Run it inside a network namespace with only loopback (tests/browser.rs does:
//   unshare -n sh -c 'ip link set lo up && exec node cluster.mjs SERVER_BINARY').
// Prints one line per check and "N passed, N failed"; exits non-zero on failure.
import { spawn } from 'node:child_process';
import {
    LOUD, chat, checker, decoded, gotChat, heard, launchChromium, pollPages, shows, sleep, startServer, stopProcess,
  tilesSeen, waitVideo,
} from './meeting.mjs';

const binary = process.argv[2];
const counts = checker();
const { check } = counts;

// The namespace has only loopback: a fixed port cannot collide with anything outside it.
const REDIS_PORT = 6390;
const redis = spawn('redis-server', ['--port', String(REDIS_PORT), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
  stdio: 'ignore',
});
await sleep(300);
const nodes = [];
let browser;
try {
  for (const [id, ip] of [['n1', '127.0.0.2'], ['n2', '127.0.0.3']]) {
    nodes.push(await startServer(binary, ['--redis', `redis://127.0.0.1:${REDIS_PORT}/`, '--node-id', id, '--media-ip', ip], {}, id));
  }
  browser = await launchChromium();
  // ada and cyd on n1, bea and dee on n2; dee sends simulcast.
  const USERS = ['ada', 'bea', 'cyd', 'dee'];
  const pages = [];
  for (const [i, user] of USERS.entries()) {
    const page = await browser.context.newPage();
    page.on('console', (m) => m.type() === 'error' && console.log(`[${user} console] ${m.text()}`));
    const simulcast = user === 'dee' ? '&simulcast=1' : '';
    await page.goto(`${nodes[i % 2].base}/?room=meet&name=${user}${simulcast}`);
    pages.push(page);
    await sleep(300);
  }
  const others = (u) => USERS.filter((x) => x !== u);

  const frames = await pollPages(pages, decoded, (f) => f.every((f, i) => others(USERS[i]).every((u) => (f[u] || 0) > 0)));
  USERS.forEach((u, i) => {
    check(`${u} decodes video from ${others(u).join(', ')}`, others(u).every((o) => (frames[i][o] || 0) > 0), frames[i]);
  });
  for (let i = 0; i < pages.length; i++) {
    const shown = await shows(pages[i], others(USERS[i]));
    check(`${USERS[i]} shows the video of ${others(USERS[i]).join(', ')}`, shown, await pages[i].evaluate(tilesSeen));
  }
  const energy = await pollPages(pages, heard, (e) => e.every((e, i) => others(USERS[i]).every((u) => (e[u] || 0) > LOUD)));
  USERS.forEach((u, i) => {
    check(`${u} hears ${others(u).join(', ')}`, others(u).every((o) => (energy[i][o] || 0) > LOUD), energy[i]);
  });
  for (let i = 0; i < pages.length; i++) await chat(pages[i], `hi from ${USERS[i]} ✓`);
  for (let i = 0; i < pages.length; i++) {
    const got = await gotChat(pages[i], others(USERS[i]), (o) => `hi from ${o} ✓`);
    check(`${USERS[i]} gets the chat of ${others(USERS[i]).join(', ')}`, got, await pages[i].evaluate(() => window.sb.chatLog));
  }

  // Simulcast across nodes: ada (n1) switches dee's (n2) video between low and high.
  const ada = pages[0];
  const first = await waitVideo(ada, 'dee', (v) => v.frames > 0 && v.width > 0);
  check('ada decodes dee\'s simulcast video from the other node', first.ok, first.v);
  if (first.ok) {
    const setQuality = (quality) => ada.evaluate(([trackId, quality]) => window.sb.io.emit('setQuality', { trackId, quality }), [first.v.id, quality]);
    await setQuality('low');
    const low = await waitVideo(ada, 'dee', (v) => v.width > 0 && v.width <= 160);
    check('setQuality low switches dee to the low layer across nodes', low.ok, low.v);
    await setQuality('high');
    const high = await waitVideo(ada, 'dee', (v) => v.width > 160);
    check('setQuality high switches dee back up across nodes', high.ok, high.v);
  }
} catch (e) {
  check('no exception', false, String(e && e.stack || e));
} finally {
    if (browser) await browser.close();
  await Promise.all(nodes.map((n) => stopProcess(n.srv)));
  await stopProcess(redis);
}
console.log(`${counts.passed} passed, ${counts.failed} failed`);
process.exit(counts.failed ? 1 : 0);
