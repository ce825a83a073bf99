package frontdoor

// HTTP pass-through (Options.HTTPPassThrough): a connection whose first
// request is not a WebSocket upgrade is handed, with the bytes already
// read replayed, to one net/http server per proxy Server, whose handler sends
// every plain request to the upstream's origin through
// httputil.ReverseProxy. An upgrade arriving later on such a kept-alive
// connection goes to PassThroughConfig.Upgrades, which hijacks it for the
// usual upgrade path (the Server's ServeHTTP).
// Upgrades that come first, the usual case, never touch net/http.

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Bounds of pass-through that are not configuration.
const (
	// passIdleTimeout closes a kept-alive client connection idle between
	// requests for this long (nginx keepalive_timeout: 75 s).
	passIdleTimeout = 75 * time.Second
	// passMaxIdleUpstream bounds the idle connections kept to the
	// upstream for reuse.
	passMaxIdleUpstream = 64
	// passUpstreamIdleTimeout closes an idle upstream connection.
	passUpstreamIdleTimeout = 90 * time.Second
	// passMaxResponseHeader bounds the upstream's response headers.
	passMaxResponseHeader = 1 << 20
	// passBodyIdleTimeout bounds each wait for more of a request's body
	// (nginx client_body_timeout: 60 s): a client that stops sending its
	// body holds a connection, a goroutine and an upstream connection no
	// longer than that, and gets 408.
	passBodyIdleTimeout = 60 * time.Second
)

// PassThroughConfig is what pass-through is given: the upstream and
// bounds of Options, the server's admission control (who a request comes
// from, behind trusted proxies), where upgrades go, and its series.
type PassThroughConfig struct {
	Upstream         *url.URL    // ws:// or wss://; requests go to its origin as http:// or https://
	TLS              *tls.Config // Options.UpstreamTLS
	DialTimeout      time.Duration
	ResponseTimeout  time.Duration // Options.HTTPResponseTimeout
	HandshakeTimeout time.Duration // a request's headers
	MaxHeaderBytes   int
	Log              zerolog.Logger
	Admission        *Admission
	// Upgrades serves an upgrade that arrives on a kept-alive
	// pass-through connection (it hijacks the connection).
	Upgrades http.Handler
	// Rejected is sluice_connections_rejected_total, by reason.
	Rejected *prometheus.CounterVec
	// Requests (by status class, StatusClass) and Seconds count and time
	// the requests passed through.
	Requests *prometheus.CounterVec
	Seconds  prometheus.Histogram
	// BodyIdleTimeout bounds each wait for more of a request's body; 0:
	// passBodyIdleTimeout.
	BodyIdleTimeout time.Duration
}

// PassThrough serves the plain HTTP requests of a server.
type PassThrough struct {
	cfg    PassThroughConfig
	origin *url.URL // the upstream with http or https for ws or wss
	web    *http.Server
	conns  *connQueue // web's listener, fed by handOff
	proxy  *httputil.ReverseProxy
	failed RejectLog // upstream failures, logged at most once a second
	served sync.WaitGroup
}

// NewPassThrough starts the pass-through server of o; Shutdown stops it.
func NewPassThrough(o PassThroughConfig) *PassThrough {
	origin := *o.Upstream
	origin.Scheme = "http"
	if o.Upstream.Scheme == "wss" {
		origin.Scheme = "https"
	}
	d := &net.Dialer{Timeout: o.DialTimeout}
	tr := &http.Transport{
		DialContext:            d.DialContext,
		TLSClientConfig:        o.TLS, // the same CAs and client certificate as wss://
		TLSHandshakeTimeout:    o.DialTimeout,
		ResponseHeaderTimeout:  o.ResponseTimeout,
		ExpectContinueTimeout:  time.Second,
		MaxIdleConns:           passMaxIdleUpstream,
		MaxIdleConnsPerHost:    passMaxIdleUpstream,
		IdleConnTimeout:        passUpstreamIdleTimeout,
		MaxResponseHeaderBytes: passMaxResponseHeader,
		// Bodies pass as they are: no Accept-Encoding added, nothing
		// decompressed.
		DisableCompression: true,
	}
	if o.BodyIdleTimeout <= 0 {
		o.BodyIdleTimeout = passBodyIdleTimeout
	}
	p := &PassThrough{cfg: o, origin: &origin, conns: newConnQueue()}
	p.proxy = &httputil.ReverseProxy{
		Rewrite:   p.rewrite,
		Transport: tr,
		// Every write is flushed at once: SSE events, long-poll answers
		// and chunks reach the client as the upstream sends them.
		FlushInterval: -1,
		ErrorHandler:  p.fail,
		ErrorLog:      netHTTPLog(o.Log),
	}
	p.web = &http.Server{
		Handler:           p,
		ReadHeaderTimeout: o.HandshakeTimeout,
		IdleTimeout:       passIdleTimeout,
		MaxHeaderBytes:    o.MaxHeaderBytes,
		ConnContext:       func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, passConnKey{}, c) },
		// No HTTP/2 here: the connections come in as HTTP/1.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     netHTTPLog(o.Log),
	}
	p.served.Add(1)
	go func() {
		defer p.served.Done()
		p.web.Serve(p.conns)
	}()
	return p
}

// HandOff gives c, whose first request r (followed by pending) is not an
// upgrade, to the pass-through server; draining, it refuses c with 503.
// It reports false when c was refused (answered) or could not be handed
// over; the caller then closes c. The connection keeps t, its place under
// the limits since its accept (Admission.Arrive), until it closes or
// turns into an upgrade (ReleasePassSlot).
func (p *PassThrough) HandOff(c net.Conn, r *Request, pending []byte, t *Slot, draining bool) bool {
	if draining {
		refuse(c, p.cfg.Rejected, http.StatusServiceUnavailable, "draining", "sluice is shutting down", 1)
		return false
	}
	pc := &passConn{Conn: c, slot: *t}
	t.HandOff() // the connection's now: released when it closes
	pc.replay = append(append(make([]byte, 0, len(r.Head)+len(pending)), r.Head...), pending...)
	if tc, ok := c.(*tls.Conn); ok {
		cs := tc.ConnectionState()
		pc.tls = &cs
	}
	c.SetDeadline(time.Time{}) // net/http sets its own
	if !p.conns.hand(pc) {
		pc.releaseSlot()
		return false
	}
	return true
}

// ServeHTTP is the pass-through server's handler: plain requests are
// passed through (Serve), upgrades go to PassThroughConfig.Upgrades.
func (p *PassThrough) ServeHTTP(w http.ResponseWriter, hr *http.Request) {
	if IsUpgradeRequest(hr) {
		p.cfg.Upgrades.ServeHTTP(w, hr)
		return
	}
	p.Serve(w, hr)
}

// Serve proxies one plain request, counted by status class and timed.
func (p *PassThrough) Serve(w http.ResponseWriter, hr *http.Request) {
	began := time.Now()
	if pc, ok := hr.Context().Value(passConnKey{}).(*passConn); ok && pc.tls != nil && hr.TLS == nil {
		hr.TLS = pc.tls
	}
	// An app may answer while the request's body still arrives (a
	// streaming echo, an upload with progress): net/http's server would
	// otherwise stop reading the body once the answer begins, and swallow
	// or cut the rest. ServeHTTP embedded in a server without it: as before.
	ctl := http.NewResponseController(w)
	ctl.EnableFullDuplex()
	if hr.Body != nil && hr.Body != http.NoBody {
		b := &idleBody{ReadCloser: hr.Body, ctl: ctl, idle: p.cfg.BodyIdleTimeout}
		hr = hr.WithContext(context.WithValue(hr.Context(), idleBodyKey{}, b)) // for fail
		hr.Body = b
	}
	rec := &statusRecorder{ResponseWriter: w}
	p.proxy.ServeHTTP(rec, hr)
	code := rec.code
	if code == 0 {
		code = http.StatusOK // nothing written: net/http answers 200
	}
	p.cfg.Requests.WithLabelValues(StatusClass(code)).Inc()
	p.cfg.Seconds.Observe(time.Since(began).Seconds())
}

// rewrite builds the upstream request: the same URL as an upgrade would
// dial (UpstreamURL), Host the upstream's, and the forwarded headers that
// ForwardedHeader writes for upgrades, with the same trusted-proxy rules.
func (p *PassThrough) rewrite(pr *httputil.ProxyRequest) {
	in := pr.In
	target, _ := url.Parse(UpstreamURL(p.origin, in.URL))
	pr.Out.URL = target
	pr.Out.Host = ""
	r := GetRequest()
	defer PutRequest(r)
	RequestFromHTTP(in, r)
	cl := p.cfg.Admission.ClientOf(r)
	clientIP, _, _ := net.SplitHostPort(r.RemoteAddr)
	var h ForwardedHeader
	h.ForwardTo(r, clientIP, cl)
	h.Rewrite(pr.Out.Header)
}

// fail answers a request the upstream did not answer: 502, or 504 on a
// timeout, as an upgrade's dial failure; nothing when the client left.
func (p *PassThrough) fail(w http.ResponseWriter, hr *http.Request, err error) {
	status, reason := DialFailure(err)
	if errors.Is(hr.Context().Err(), context.Canceled) {
		status, reason = 499, "client_gone"
	}
	if b, ok := hr.Context().Value(idleBodyKey{}).(*idleBody); ok && b.stalled() {
		// The client's fault, not the upstream's. The connection closes
		// after the answer: what is left of the body would be read as
		// the next request.
		w.Header().Set("Connection", "close")
		p.cfg.Log.Debug().Str("client", hr.RemoteAddr).Dur("body_idle_timeout", b.idle).Msg("request body stalled")
		status, reason = http.StatusRequestTimeout, "client_gone"
	}
	if reason != "client_gone" {
		if n, ok := p.failed.Note(time.Since(p.cfg.Admission.Began())); ok {
			p.cfg.Log.Warn().Err(err).Str("upstream", p.origin.Redacted()).Str("reason", reason).
				Uint64("failures", n).Msg("upstream http request failed")
		}
	}
	w.WriteHeader(status)
}

// Shutdown stops the pass-through server: idle connections close at once,
// requests under way may finish until ctx ends, and are then cut off.
func (p *PassThrough) Shutdown(ctx context.Context) {
	if p.web.Shutdown(ctx) != nil {
		p.web.Close()
	}
	p.served.Wait()
}

// IsUpgradeRequest reports whether net/http's request asks for a
// WebSocket, as CheckUpgrade's first test does.
func IsUpgradeRequest(hr *http.Request) bool {
	for _, v := range hr.Header.Values("Upgrade") {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), "websocket") {
				return true
			}
		}
	}
	return false
}

// netHTTPLog sends what net/http and ReverseProxy would print on stderr
// (a client gone mid-answer, a malformed request) to log at debug level:
// per-request noise, not events.
func netHTTPLog(log zerolog.Logger) *stdlog.Logger {
	return stdlog.New(debugWriter{log}, "", 0)
}

type debugWriter struct{ log zerolog.Logger }

func (w debugWriter) Write(p []byte) (int, error) {
	w.log.Debug().Str("from", "net/http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}

// passConn is a connection handed to the pass-through server: the bytes
// sluice read replayed first, and its admission slot freed once, when it
// closes or turns into an upgrade (which takes a slot of its own). It has
// no SyscallConn on purpose: a frame reader must read through Read.
type passConn struct {
	net.Conn
	replay []byte               // read only by Read, which net/http calls from one goroutine at a time
	tls    *tls.ConnectionState // nil for plain connections

	once sync.Once
	slot Slot // released through once
}

type passConnKey struct{}

func (c *passConn) Read(b []byte) (int, error) {
	if len(c.replay) > 0 {
		n := copy(b, c.replay)
		c.replay = c.replay[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

func (c *passConn) Close() error {
	c.releaseSlot()
	return c.Conn.Close()
}

func (c *passConn) releaseSlot() { c.once.Do(c.slot.Release) }

// ReleasePassSlot frees the admission slot of c when it is a pass-through
// connection (net/http's, hijacked for an upgrade, which takes a slot of
// its own); otherwise it does nothing.
func ReleasePassSlot(c net.Conn) {
	if pc, ok := c.(*passConn); ok {
		pc.releaseSlot()
	}
}

// connQueue is a net.Listener whose connections are handed to it.
type connQueue struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{conns: make(chan net.Conn), done: make(chan struct{})}
}

// hand passes c to Accept; false once the queue is closed.
func (q *connQueue) hand(c net.Conn) bool {
	select {
	case q.conns <- c:
		return true
	case <-q.done:
		return false
	}
}

func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.conns:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.done) })
	return nil
}

func (q *connQueue) Addr() net.Addr { return passAddr{} }

type passAddr struct{}

func (passAddr) Network() string { return "pass-through" }
func (passAddr) String() string  { return "pass-through" }

// statusRecorder notes the final status a handler wrote. Unwrap lets
// http.ResponseController reach the flusher and hijacker underneath.
type statusRecorder struct {
	http.ResponseWriter
	code int // the first final (non-1xx) status; 0 until then
}

func (w *statusRecorder) WriteHeader(code int) {
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusRecorder) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusRecorder) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusRecorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// statusClasses are the code label of sluice_http_requests_total: the
// class of the status, so the series stay few.
var statusClasses = []string{"1xx", "2xx", "3xx", "4xx", "5xx"}

// FinalStatusClasses are the labels StatusClass gives final answers, for
// creating their series up front.
func FinalStatusClasses() []string { return slices.Clone(statusClasses[1:]) }

// StatusClass is the code label of sluice_http_requests_total for code.
func StatusClass(code int) string {
	if code >= 100 && code < 600 {
		return statusClasses[code/100-1]
	}
	return "other"
}

type idleBodyKey struct{}

// idleBody is a request's body whose every read must bring bytes within
// idle: a read deadline on the client's connection, lifted when the body
// ends, before net/http's own read of the connection begins.
type idleBody struct {
	io.ReadCloser
	ctl  *http.ResponseController
	idle time.Duration

	deadline atomic.Int64 // the read under way's deadline, Unix ns; 0 between reads
	mu       sync.Mutex   // held by Read
	timedOut bool         // guarded by mu
}

func (b *idleBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	d := time.Now().Add(b.idle)
	b.deadline.Store(d.UnixNano())
	b.ctl.SetReadDeadline(d)
	n, err := b.ReadCloser.Read(p)
	b.deadline.Store(0)
	switch {
	case err == nil:
	case errors.Is(err, os.ErrDeadlineExceeded):
		// The deadline stays: net/http's discard of the body's rest
		// then fails at once, and the connection closes.
		b.timedOut = true
	default:
		b.ctl.SetReadDeadline(time.Time{})
	}
	return n, err
}

// stalled reports whether the body's read timed out. The read's error
// cancels the request (net/http cancels it on any read error of the
// connection) before Read returns: a read past its deadline is waited
// for, so that it has returned before the answer, and net/http's next
// read of the connection does not meet it.
func (b *idleBody) stalled() bool {
	if d := b.deadline.Load(); d != 0 && time.Now().UnixNano() >= d {
		b.mu.Lock() // a read past its deadline: about to return
	} else if !b.mu.TryLock() {
		return false // a read under way, within its deadline
	}
	defer b.mu.Unlock()
	return b.timedOut
}
