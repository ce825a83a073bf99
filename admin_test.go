package main

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestAdminPprof: Go's profiles are on the admin listener only when
// SLUICE_PPROF is true, and never on the proxy listener.
func TestAdminPprof(t *testing.T) {
	defer goleak.VerifyNone(t)
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	get := func(t *testing.T, url string) (int, []byte) {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: reading the body: %v", url, err)
		}
		return resp.StatusCode, body
	}
	// isProfile reports whether b is a gzipped profile, as go tool pprof
	// reads it.
	isProfile := func(b []byte) bool {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return false
		}
		raw, err := io.ReadAll(zr)
		return err == nil && len(raw) > 0
	}

	for _, tt := range []struct {
		name string
		env  map[string]string
		on   bool
	}{
		{"unset", map[string]string{}, false},
		{"false", map[string]string{envPrefix + "PPROF": "false"}, false},
		{"true", map[string]string{envPrefix + "PPROF": "true"}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.env[envPrefix+"UPSTREAM_URL"] = "ws://127.0.0.1:1/"
			tt.env[envPrefix+"SHUTDOWN_TIMEOUT"] = "3s"
			wsAddr, adminAddr, _, stop := startSluice(t, tt.env)
			defer stop()

			if code, _ := get(t, "http://"+adminAddr+"/healthz"); code != http.StatusOK {
				t.Fatalf("/healthz: %d, want 200", code)
			}
			for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/cmdline"} {
				if code, _ := get(t, "http://"+wsAddr+path); code == http.StatusOK {
					t.Errorf("proxy listener serves %s", path)
				}
				code, _ := get(t, "http://"+adminAddr+path)
				if !tt.on && code != http.StatusNotFound {
					t.Errorf("admin %s: %d, want 404 with profiles off", path, code)
				}
				if tt.on && code != http.StatusOK {
					t.Errorf("admin %s: %d, want 200 with profiles on", path, code)
				}
			}
			if !tt.on {
				return
			}
			for _, path := range []string{"/debug/pprof/heap", "/debug/pprof/goroutine", "/debug/pprof/profile?seconds=1"} {
				code, body := get(t, "http://"+adminAddr+path)
				if code != http.StatusOK || !isProfile(body) {
					t.Errorf("admin %s: %d with %d bytes, want 200 and a gzipped profile", path, code, len(body))
				}
			}
			if _, body := get(t, "http://"+adminAddr+"/debug/pprof/cmdline"); len(body) == 0 {
				t.Error("admin /debug/pprof/cmdline: empty")
			}
		})
	}
}
