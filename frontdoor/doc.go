// Package frontdoor is everything a client connection meets before it is
// a WebSocket session: the request read off the socket and checked as
// net/http checks it (request.go), who the client is behind trusted
// proxies and the X-Forwarded-* sent upstream (clientaddr.go), allowed
// origins (origin.go), the answers sluice writes itself — 101 and
// refusals (answer.go), the upstream's upgrade dialled, bounded and its
// refusal cleaned before it is relayed (handshake.go), and URLs as log
// lines carry them (logurl.go).
//
// It holds no server: package proxy runs the accept loop, calls in here
// with explicit inputs, and hands the upgraded pair to a session. Nothing
// here imports proxy.
package frontdoor
