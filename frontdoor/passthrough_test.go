package frontdoor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func TestStatusClass(t *testing.T) {
	for code, want := range map[int]string{101: "1xx", 200: "2xx", 204: "2xx", 304: "3xx", 404: "4xx", 499: "4xx", 502: "5xx", 599: "5xx", 600: "other", 0: "other"} {
		if got := StatusClass(code); got != want {
			t.Errorf("StatusClass(%d) = %q, want %q", code, got, want)
		}
	}
}

// TestPassThroughBodyStall: a client that stops sending its request body
// gets 408 once BodyIdleTimeout passes with no byte of it, and its
// connection is closed; a body that keeps arriving, slower than the
// timeout in all but never idle that long, passes whole.
func TestPassThroughBodyStall(t *testing.T) {
	got := make(chan int, 2)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- len(b)
		fmt.Fprintf(w, "app read %d bytes", len(b))
	}))
	defer app.Close()
	u, _ := url.Parse("ws://" + app.Listener.Addr().String())
	adm, err := NewAdmission(AdmissionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	p := NewPassThrough(PassThroughConfig{
		Upstream: u, Log: zerolog.Nop(), Admission: adm, DialTimeout: 5 * time.Second,
		Rejected:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rejected"}, []string{"reason"}),
		Requests:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "requests"}, []string{"class"}),
		Seconds:         prometheus.NewHistogram(prometheus.HistogramOpts{Name: "seconds"}),
		BodyIdleTimeout: 300 * time.Millisecond,
	})
	defer p.Shutdown(context.Background())
	front := httptest.NewServer(p)
	defer front.Close()

	post := func(t *testing.T, chunks int, gap time.Duration) (*http.Response, net.Conn) {
		c, err := net.Dial("tcp", front.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n")
		for i := range chunks {
			if i > 0 {
				time.Sleep(gap) // the client's pace is what is under test
			}
			c.Write(bytes.Repeat([]byte{'x'}, 10))
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("no answer to a POST with %d of its 10 chunks: %v", chunks, err)
		}
		return resp, c
	}

	t.Run("stalled", func(t *testing.T) {
		resp, c := post(t, 1, 0)
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("a body stalled after 10 of 100 bytes: %d, want 408", resp.StatusCode)
		}
		io.Copy(io.Discard, resp.Body)
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("the connection after 408: %v, want EOF", err)
		}
		if n := <-got; n >= 100 {
			t.Fatalf("the app read %d bytes of a body cut at 10", n)
		}
	})
	t.Run("slow but steady", func(t *testing.T) {
		resp, _ := post(t, 10, 100*time.Millisecond) // 0.9 s in all, never idle 300 ms
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != "app read 100 bytes" {
			t.Fatalf("a steady body: %d %q, want 200 \"app read 100 bytes\"", resp.StatusCode, b)
		}
		<-got
	})
}
