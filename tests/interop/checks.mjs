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
