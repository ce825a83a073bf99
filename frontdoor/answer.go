package frontdoor

// The answers sluice writes to a client itself, byte for byte what
// net/http wrote for them before, each in one write: the 101, its
// refusals, and an upstream's refusal relayed.

import (
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"
	"github.com/prometheus/client_golang/prometheus"
)

var answerPool = sync.Pool{New: func() any {
	b := make([]byte, 0, 1024)
	return &b
}}

// writeAnswer writes b to c in one write and recycles it.
func writeAnswer(c net.Conn, bp *[]byte, b []byte) error {
	_, err := c.Write(b)
	if cap(b) <= 16<<10 {
		*bp = b[:0]
		answerPool.Put(bp)
	}
	return err
}

func appendStatusLine(b []byte, status int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	if text := http.StatusText(status); text != "" {
		b = append(b, text...)
	} else {
		// As net/http words a status it has no text for.
		b = append(b, "status code "...)
		b = strconv.AppendInt(b, int64(status), 10)
	}
	return append(b, "\r\n"...)
}

func appendHeader(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, ": "...)
	b = append(b, value...)
	return append(b, "\r\n"...)
}

func appendDate(b []byte) []byte {
	b = append(b, "Date: "...)
	b = time.Now().UTC().AppendFormat(b, http.TimeFormat)
	return append(b, "\r\n"...)
}

// WriteError answers c with status and a text body msg, as http.Error did
// with Connection: close; retry > 0 adds Retry-After, and a 426 names the
// protocol and version sluice speaks.
func WriteError(c net.Conn, status int, msg string, retry int) error {
	bp := answerPool.Get().(*[]byte)
	b := appendStatusLine(*bp, status)
	b = appendHeader(b, "Connection", "close")
	b = append(b, "Content-Length: "...)
	b = strconv.AppendInt(b, int64(len(msg)+1), 10)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\n"...)
	b = appendDate(b)
	if retry > 0 {
		b = append(b, "Retry-After: "...)
		b = strconv.AppendInt(b, int64(retry), 10)
		b = append(b, "\r\n"...)
	}
	if status == http.StatusUpgradeRequired {
		b = appendHeader(b, "Sec-Websocket-Version", "13")
		b = appendHeader(b, "Upgrade", "websocket")
	}
	b = append(b, "X-Content-Type-Options: nosniff\r\n\r\n"...)
	b = append(b, msg...)
	b = append(b, '\n')
	return writeAnswer(c, bp, b)
}

// WriteBadRequest answers a request that could not be read, as net/http
// did: a fixed text, nothing else.
func WriteBadRequest(c net.Conn, status int) error {
	text := strconv.Itoa(status) + " " + http.StatusText(status)
	bp := answerPool.Get().(*[]byte)
	b := append(*bp, "HTTP/1.1 "...)
	b = append(b, text...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"...)
	b = append(b, text...)
	return writeAnswer(c, bp, b)
}

// WriteRejection relays an upstream's refusal: its status, headers (less
// hop-by-hop ones, ReadRejection dropped them) and bounded body.
func WriteRejection(c net.Conn, rej *Rejection) error {
	h := rej.header
	h.Set("Content-Length", strconv.Itoa(len(rej.body)))
	h.Set("Connection", "close")
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	if len(rej.body) > 0 && len(h.Values("Content-Type")) == 0 {
		h.Set("Content-Type", http.DetectContentType(rej.body)) // as net/http sniffed
	}
	bp := answerPool.Get().(*[]byte)
	buf := bytes.NewBuffer(appendStatusLine(*bp, rej.status))
	h.Write(buf)
	buf.WriteString("\r\n")
	buf.Write(rej.body)
	return writeAnswer(c, bp, buf.Bytes())
}

// acceptGUID is RFC 6455's magic string for Sec-WebSocket-Accept.
const acceptGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// Write101 accepts the client's upgrade with the upstream's choices: its
// subprotocol, its extensions verbatim, and its cookies.
func Write101(c net.Conn, key string, hs ws.Handshake, cookies []string) error {
	var kg [24 + len(acceptGUID)]byte
	copy(kg[copy(kg[:], key):], acceptGUID)
	sum := sha1.Sum(kg[:])
	var accept [28]byte
	base64.StdEncoding.Encode(accept[:], sum[:])

	bp := answerPool.Get().(*[]byte)
	b := append(*bp, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "...)
	b = append(b, accept[:]...)
	b = append(b, "\r\n"...)
	if hs.Protocol != "" {
		b = appendHeader(b, "Sec-WebSocket-Protocol", hs.Protocol)
	}
	if len(hs.Extensions) > 0 {
		b = append(b, "Sec-WebSocket-Extensions: "...)
		w := bytes.NewBuffer(b)
		httphead.WriteOptions(w, hs.Extensions)
		b = append(w.Bytes(), "\r\n"...)
	}
	for _, v := range cookies {
		b = appendHeader(b, "Set-Cookie", v)
	}
	b = append(b, "\r\n"...)
	return writeAnswer(c, bp, b)
}

// refuse answers c with status and msg, counted in rejected under reason;
// retry > 0 is a Retry-After.
func refuse(c net.Conn, rejected *prometheus.CounterVec, status int, reason, msg string, retry int) {
	rejected.WithLabelValues(reason).Inc()
	WriteError(c, status, msg, retry)
}

// CloseWriteAndWait ends a refusal sent before the client's request was
// all read, as net/http does: half-close, then read what the client still
// sends, briefly, so that closing with unread bytes does not reset the
// connection before the client has read the answer.
func CloseWriteAndWait(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.Copy(io.Discard, io.LimitReader(c, 1<<20))
}
