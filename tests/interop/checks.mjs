// Bookkeeping shared by the node check scripts: one line per check, then "N passed, N failed"
// (the Rust side asserts that exact line, so a check that silently stopped running is noticed).
let passed = 0;
let failed = 0;

export async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

/** Prints the summary and exits, non-zero on any failure. */
export function finish() {
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

/**
 * Queues every `msg` the socket gets; `socket.next(match)` resolves with the next queued or
 * future one for which `match` is true, or rejects after `timeout` ms naming `who`. Resolves
 * once connected, rejects on connect_error.
 */
export function withQueuedMsgs(socket, who, timeout) {
  const queue = [];
  const waiters = [];
  socket.on('msg', (data) => {
    const w = waiters.findIndex((x) => x.match(data));
    if (w >= 0) waiters.splice(w, 1)[0].resolve(data);
    else queue.push(data);
  });
  socket.next = (match = () => true) => {
    const i = queue.findIndex(match);
    if (i >= 0) return Promise.resolve(queue.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      const w = { match, resolve };
      waiters.push(w);
      setTimeout(() => {
        const k = waiters.indexOf(w);
        if (k >= 0) {
          waiters.splice(k, 1);
          reject(new Error(`${who}: no matching msg within ${timeout} ms`));
        }
      }, timeout);
    });
  };
  return new Promise((resolve, reject) => {
    socket.on('connect', () => resolve(socket));
    socket.on('connect_error', (e) => reject(e));
  });
}
