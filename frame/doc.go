// Package frame reads, checks and writes WebSocket frames (RFC 6455) for a
// proxy that forwards them one by one.
//
// A proxy never needs a whole message in memory: it reads a header, checks it
// against the connection's state and limits, writes it on, and copies the
// payload. This package holds the pieces of that path that know the wire
// format: a Checker per direction, close-frame parsing, header and control
// frame encoding into caller buffers, pooled buffers, and a Reader whose
// buffer is borrowed from a pool only while bytes are waiting, so an idle
// connection holds none.
package frame
