// Package wstest holds the test parts that sluice's proxy and end-to-end
// tests share (coder/websocket's internal/test/wstest): a raw-frame
// client, a raw gobwas/ws backend runner with an echo, frame helpers and
// the timeouts that keep a failing test from hanging. Only tests import
// it, so the gorilla and coder libraries the tests use never reach the
// sluice binary.
package wstest

import "time"

// IOTimeout bounds every read, write and wait, so a failure cannot hang.
const IOTimeout = 5 * time.Second

// ShutdownTimeout bounds the Shutdown that ends each proxy under test.
const ShutdownTimeout = 10 * time.Second
