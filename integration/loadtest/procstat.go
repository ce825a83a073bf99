//go:build linux

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Process statistics from /proc. Every process the harness starts leads its
// own process group, and a "process" here is that whole group (a proxy
// started through sh, or nginx with its workers, counts as one).

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It is
// 100 on every Linux architecture Go supports (sysconf(_SC_CLK_TCK) would
// need cgo to ask).
const clockTicks = 100

// pageSize converts the rss field of /proc/PID/stat (pages) to bytes.
var pageSize = int64(os.Getpagesize())

// groupStat is one sample of a process group: the summed resident set and
// the summed CPU time (user + system) of its live members.
type groupStat struct {
	RSS   int64   // bytes
	CPU   float64 // seconds
	Procs int     // live members found
}

// sampleGroups reads /proc once and returns a sample for each of pgids
// (absent from the map when no member lives).
func sampleGroups(pgids ...int) map[int]groupStat {
	out := make(map[int]groupStat, len(pgids))
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue // exited meanwhile
		}
		for _, g := range pgids {
			if st.pgrp == g {
				s := out[g]
				s.RSS += st.rss
				s.CPU += st.cpu
				s.Procs++
				out[g] = s
			}
		}
	}
	return out
}

// procStat is what the harness uses of /proc/PID/stat.
type procStat struct {
	pgrp int
	cpu  float64 // utime + stime, seconds
	rss  int64   // bytes
}

// readStat parses /proc/PID/stat. The command name (field 2) may contain
// spaces and parentheses, so fields are counted from the last ')'.
func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("procstat: /proc/%d/stat: no command name", pid)
	}
	// After ") ": field 3 (state) is index 0, so field N is index N-3.
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 22 {
		return procStat{}, fmt.Errorf("procstat: /proc/%d/stat: %d fields", pid, len(f)+2)
	}
	pgrp, err1 := strconv.Atoi(f[5-3])
	utime, err2 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err3 := strconv.ParseInt(f[15-3], 10, 64)
	rss, err4 := strconv.ParseInt(f[24-3], 10, 64)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return procStat{}, fmt.Errorf("procstat: /proc/%d/stat: %w", pid, err)
	}
	return procStat{pgrp: pgrp, cpu: float64(utime+stime) / clockTicks, rss: rss * pageSize}, nil
}

// selfCPU is the harness's own CPU seconds so far (user + system), to show
// how much of the shared CPUs the clients themselves took.
func selfCPU() float64 {
	st, err := readStat(os.Getpid())
	if err != nil {
		return 0
	}
	return st.cpu
}

// peakRSS reads VmHWM, the high-water mark of one process's resident set,
// which catches spikes between samples. 0 when unknown.
func peakRSS(pid int) int64 {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

// monitor samples the backend's and the target's process groups, sluice's
// queued bytes and the machine's TCP socket memory and orphans
// (/proc/net/sockstat), every interval, keeping peaks.
type monitor struct {
	interval time.Duration
	groups   []*watched
	metrics  string // sluice admin host:port; "" when the target is not sluice

	mu          sync.Mutex // guards peakQueued and the watched samples
	peakQueued  float64    // highest sluice_queued_bytes seen
	scrapeError error      // last failed scrape, if every scrape failed
	scrapes     int        // successful scrapes

	// sockstat's TCP line (machine-wide), from tcpBaseline on.
	tcpBase, tcpPeak, tcpLast tcpSockstat
	tcpErr                    error // last failed read

	stop chan struct{}
	done chan struct{}
}

// watched is one process group under a monitor. Its fields are guarded by
// the monitor's mu.
type watched struct {
	proc *process
	last groupStat // latest sample
	peak int64     // highest summed RSS sampled
}

// newMonitor starts a sampler over the given processes (nil ones are
// skipped). Stop it with stopMonitor.
func newMonitor(interval time.Duration, adminAddr string, procs ...*process) *monitor {
	m := &monitor{interval: interval, metrics: adminAddr, stop: make(chan struct{}), done: make(chan struct{})}
	for _, p := range procs {
		if p != nil {
			m.groups = append(m.groups, &watched{proc: p})
		}
	}
	m.sample()
	go m.sampler()
	return m
}

// sampler is the monitor's goroutine.
func (m *monitor) sampler() {
	defer close(m.done)
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.sample()
		}
	}
}

// sample takes one sample of every group and of sluice's queued bytes.
func (m *monitor) sample() {
	pgids := make([]int, len(m.groups))
	for i, w := range m.groups {
		pgids[i] = w.proc.pgid
	}
	stats := sampleGroups(pgids...)
	tcp, tcpErr := readSockstat()
	var queued float64
	var err error
	if m.metrics != "" {
		var ms metricSet
		ms, err = scrapeMetrics(m.metrics, time.Second)
		queued = ms.sum("sluice_queued_bytes")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range m.groups {
		if s, ok := stats[w.proc.pgid]; ok {
			w.last = s
			w.peak = max(w.peak, s.RSS)
		}
	}
	if m.metrics != "" {
		if err != nil {
			m.scrapeError = err
		} else {
			m.scrapes++
			m.peakQueued = max(m.peakQueued, queued)
		}
	}
	if tcpErr != nil {
		m.tcpErr = tcpErr
	} else {
		m.tcpLast = tcp
		m.tcpPeak.Mem = max(m.tcpPeak.Mem, tcp.Mem)
		m.tcpPeak.Orphan = max(m.tcpPeak.Orphan, tcp.Orphan)
	}
}

// now takes a fresh sample of p's group and returns it.
func (m *monitor) now(p *process) groupStat {
	if p == nil {
		return groupStat{}
	}
	s := sampleGroups(p.pgid)[p.pgid]
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range m.groups {
		if w.proc == p && s.Procs > 0 {
			w.last = s
			w.peak = max(w.peak, s.RSS)
		}
	}
	return s
}

// peak is the highest resident set of p's group: the sampled peak, or the
// leader's VmHWM when the group is that one process and it is higher.
func (m *monitor) peak(p *process) int64 {
	if p == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range m.groups {
		if w.proc == p {
			if w.last.Procs == 1 {
				return max(w.peak, peakRSS(p.pid))
			}
			return w.peak
		}
	}
	return 0
}

// queuedPeak is the highest sluice_queued_bytes scraped, and an error if no
// scrape succeeded.
func (m *monitor) queuedPeak() (float64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.scrapes == 0 && m.scrapeError != nil {
		return 0, m.scrapeError
	}
	return m.peakQueued, nil
}

// stopMonitor ends the sampler and waits for it.
func (m *monitor) stopMonitor() {
	select {
	case <-m.stop:
	default:
		close(m.stop)
	}
	<-m.done
}

// tcpSockstat is the TCP line of /proc/net/sockstat, machine-wide (this
// network namespace): every TCP socket, not only the run's.
type tcpSockstat struct {
	InUse  int64
	Orphan int64 // closed by their process, still holding unsent or unacknowledged data
	TW     int64
	Alloc  int64
	Mem    int64 // bytes: the "mem" field (pages) times the page size
}

// readSockstat reads /proc/net/sockstat.
func readSockstat() (tcpSockstat, error) {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return tcpSockstat{}, err
	}
	return parseSockstat(string(b), pageSize)
}

// parseSockstat parses the "TCP:" line of /proc/net/sockstat text, such as
// "TCP: inuse 27 orphan 0 tw 0 alloc 30 mem 3", converting mem from pages
// to bytes with page. Unknown fields are ignored; mem and orphan are
// required.
func parseSockstat(text string, page int64) (tcpSockstat, error) {
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, "TCP:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f)%2 != 0 {
			return tcpSockstat{}, fmt.Errorf("sockstat: odd TCP line %q", line)
		}
		var st tcpSockstat
		var haveMem, haveOrphan bool
		for i := 0; i < len(f); i += 2 {
			v, err := strconv.ParseInt(f[i+1], 10, 64)
			if err != nil {
				return tcpSockstat{}, fmt.Errorf("sockstat: TCP %s: %w", f[i], err)
			}
			switch f[i] {
			case "inuse":
				st.InUse = v
			case "orphan":
				st.Orphan, haveOrphan = v, true
			case "tw":
				st.TW = v
			case "alloc":
				st.Alloc = v
			case "mem":
				st.Mem, haveMem = v*page, true
			}
		}
		if !haveMem || !haveOrphan {
			return tcpSockstat{}, fmt.Errorf("sockstat: TCP line %q lacks mem or orphan", line)
		}
		return st, nil
	}
	return tcpSockstat{}, errors.New("sockstat: no TCP line")
}

// tcpBaseline reads sockstat now as the baseline of the TCP memory figures
// and restarts their peaks from it. Call it just before clients connect.
func (m *monitor) tcpBaseline() {
	st, err := readSockstat()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tcpErr = err
	m.tcpBase, m.tcpPeak, m.tcpLast = st, st, st
}

// tcpFigures returns the baseline, the peaks (Mem and Orphan, each its own
// maximum) and the last sample of sockstat's TCP line since tcpBaseline,
// and the last read error when any read failed.
func (m *monitor) tcpFigures() (base, peak, last tcpSockstat, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tcpBase, m.tcpPeak, m.tcpLast, m.tcpErr
}
