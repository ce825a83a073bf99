//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Profiles (-profile DIR): every sluice target runs with SLUICE_PPROF=true,
// and each measured window gets a CPU profile over it and a heap profile at
// its end, fetched from sluice's admin listener. A profile that cannot be
// fetched is a note in the report, not a failed run.

const (
	// profileGrace is how long past its N seconds a CPU profile request
	// may take, and how long a heap profile request may take.
	profileGrace = 10 * time.Second
	// profileSlack is what profiling may add to a run: the CPU profile
	// finishing after the window, then the heap profile.
	profileSlack = 2 * profileGrace
	// maxProfileBytes caps a profile read into memory.
	maxProfileBytes = 256 << 20
	// maxProfileName caps the target part of a profile's file name.
	maxProfileName = 80
)

// profiles collects what -profile wrote and what it could not fetch.
type profiles struct {
	dir string

	mu       sync.Mutex
	written  []string // file paths; guarded by mu
	failures []string // guarded by mu
}

// record notes file as written, or err as a failure, also on stderr.
func (p *profiles) record(stderr io.Writer, file string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		msg := fmt.Sprintf("%s not written: %v", filepath.Base(file), err)
		fmt.Fprintf(stderr, "loadtest: profile %s\n", msg)
		p.failures = append(p.failures, msg)
		return
	}
	p.written = append(p.written, file)
}

// writeNotes adds the profiles' bullets to a report's notes.
func (p *profiles) writeNotes(w io.Writer, cfg config) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(w, "- profiles (-profile): sluice targets ran with SLUICE_PPROF=true; a CPU profile over each measured\n"+
		"  window (%d s) and a heap profile at its end (after a GC, taken once the window's numbers are read)\n"+
		"  are in %s as %s.cpu.pprof and .heap.pprof (go tool pprof -top FILE). The CPU\n"+
		"  profile's sampling (100 Hz) costs sluice a little of the CPU shown.\n",
		profileSeconds(cfg.duration), p.dir, profilePattern(cfg))
	for _, f := range p.failures {
		fmt.Fprintf(w, "- profile %s\n", f)
	}
}

// profilePattern is how profile files are named.
func profilePattern(cfg config) string {
	if len(cfg.sizes) > 0 {
		return "MODE-TARGET-SIZE-rROUND"
	}
	return "MODE-TARGET-rROUND"
}

// printWritten lists the files written, for the end of the run.
func (p *profiles) printWritten(w io.Writer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.written) == 0 {
		fmt.Fprintf(w, "loadtest: no profiles written to %s\n", p.dir)
		return
	}
	fmt.Fprintf(w, "loadtest: %d profiles written:\n", len(p.written))
	for _, f := range p.written {
		fmt.Fprintf(w, "  %s\n", f)
	}
}

// profileSeconds is the CPU profile's length for a window: whole seconds,
// at least one.
func profileSeconds(window time.Duration) int {
	return max(1, int(window/time.Second))
}

// profileNames sets the file name part of every sluice target: its label
// in [a-z0-9._-], with the target's position appended when two labels
// come out the same.
func profileNames(specs []targetSpec) {
	seen := map[string]bool{}
	for i := range specs {
		if specs[i].kind != kindSluice {
			continue
		}
		name := sanitiseLabel(specs[i].label)
		if seen[name] {
			name = fmt.Sprintf("%s-%d", name, i+1)
		}
		seen[name] = true
		specs[i].profileName = name
	}
}

// sanitiseLabel lower-cases label and turns every run of characters
// outside [a-z0-9._] into one "-".
func sanitiseLabel(label string) string {
	var b strings.Builder
	dash := false
	for _, c := range strings.ToLower(label) {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' {
			b.WriteRune(c)
			dash = false
		} else if !dash {
			b.WriteByte('-')
			dash = true
		}
	}
	s := strings.Trim(b.String(), "-.")
	if len(s) > maxProfileName {
		s = strings.TrimRight(s[:maxProfileName], "-.")
	}
	if s == "" {
		s = "target"
	}
	return s
}

// profileRun profiles one measured window of one sluice target. A nil
// *profileRun (profiling off, or not sluice) does nothing. Its methods are
// called by the run's goroutine.
type profileRun struct {
	r       *runner
	base    string // DIR/MODE-TARGET-rROUND
	admin   string
	cancel  context.CancelFunc
	cpuDone chan struct{} // closed once the CPU profile request ended
	cpuErr  error         // set before cpuDone is closed
	over    bool          // end or stop ran
}

// startProfile starts a CPU profile of tg for window, if -profile asks for
// one; call end when the window ends, and stop (deferred) in any case.
func (r *runner) startProfile(ctx context.Context, tg *target, window time.Duration) *profileRun {
	if r.profiles == nil || tg.spec.kind != kindSluice || tg.admin == "" {
		return nil
	}
	secs := profileSeconds(window)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+profileGrace)
	p := &profileRun{
		r:       r,
		base:    filepath.Join(r.profiles.dir, r.profileBase(tg.spec)),
		admin:   tg.admin,
		cancel:  cancel,
		cpuDone: make(chan struct{}),
	}
	go func() {
		defer close(p.cpuDone)
		p.cpuErr = fetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", p.admin, secs), p.base+".cpu.pprof")
	}()
	return p
}

// profileBase is a run's profile file name without its extension:
// MODE-TARGET-rROUND, or MODE-TARGET-SIZE-rROUND with -sizes.
func (r *runner) profileBase(spec targetSpec) string {
	if len(r.cfg.sizes) > 0 {
		return fmt.Sprintf("%s-%s-%s-r%d", r.cfg.mode, spec.profileName, strings.ReplaceAll(sizeName(r.cfg.size), " ", ""), r.round)
	}
	return fmt.Sprintf("%s-%s-r%d", r.cfg.mode, spec.profileName, r.round)
}

// end fetches the heap profile, after a GC so that it shows what is live
// at the end of the window, waits for the CPU profile and records both.
// Callers read the window's own numbers first: the GC and serving the
// profile are not part of the load.
func (p *profileRun) end(ctx context.Context) {
	if p == nil || p.over {
		return
	}
	p.over = true
	hctx, cancel := context.WithTimeout(ctx, profileGrace)
	heap := p.base + ".heap.pprof"
	err := fetchProfile(hctx, "http://"+p.admin+"/debug/pprof/heap?gc=1", heap)
	cancel()
	<-p.cpuDone
	p.cancel()
	p.r.profiles.record(p.r.stderr, p.base+".cpu.pprof", p.cpuErr)
	p.r.profiles.record(p.r.stderr, heap, err)
}

// stop abandons the profiles of a window that did not end (the run
// failed): nothing is recorded.
func (p *profileRun) stop() {
	if p == nil || p.over {
		return
	}
	p.over = true
	p.cancel()
	<-p.cpuDone
}

// fetchProfile GETs url and writes its body, which must be a non-empty
// 200 answer, to file.
func fetchProfile(ctx context.Context, url, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	client := http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxProfileBytes+1))
	switch {
	case err != nil:
		return fmt.Errorf("%s: reading: %w", url, err)
	case resp.StatusCode != http.StatusOK:
		msg, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n")
		return fmt.Errorf("%s: %s: %.200s", url, resp.Status, msg)
	case len(body) == 0:
		return fmt.Errorf("%s: empty profile", url)
	case len(body) > maxProfileBytes:
		return fmt.Errorf("%s: profile larger than %d bytes", url, maxProfileBytes)
	}
	if err := os.WriteFile(file, body, 0o644); err != nil {
		os.Remove(file) // a partial file is no profile
		return err
	}
	return nil
}
