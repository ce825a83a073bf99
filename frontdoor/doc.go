// Package frontdoor is everything a client connection meets before it is
// a WebSocket session:
//
//   - request.go: the request read off the socket and checked as net/http
//     checks it, into a pooled Request;
//   - clientaddr.go: who the client is behind trusted proxies, and the
//     X-Forwarded-* sent upstream (ForwardedHeader); origin.go: allowed
//     origins;
//   - admission.go: connection limits per server and per address, and the
//     handshake rate (Admission, Slot);
//   - pacing.go: upgrades waiting their turn toward the backend, fairly
//     across addresses (Pacer);
//   - proxyproto.go: the PROXY protocol header;
//   - handshake.go: the upstream's upgrade dialled with a bounded answer,
//     and a refusal cleaned before it is relayed (DialState);
//   - answer.go: the answers sluice writes itself, 101 and refusals;
//   - passthrough.go: plain HTTP requests sent to the upstream's origin;
//   - logurl.go: URLs as log lines carry them.
//
// It holds no server: package proxy runs the accept loop, calls in here
// with explicit inputs (configs, Prometheus collectors, a logger), and
// hands the upgraded pair to a session. Nothing here imports proxy.
package frontdoor
