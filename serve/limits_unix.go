//go:build unix

package serve

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// readHostLimits reads RLIMIT_NOFILE, raising the soft limit to the hard
// one first. Go's runtime does so at start since Go 1.19 (to one below,
// go.dev/issue/46279); this covers a limit lowered since and names what
// sluice runs with. The ephemeral port range is Linux's; elsewhere it
// stays unknown.
func readHostLimits() (hostLimits, error) {
	var l hostLimits
	var errs []error
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		errs = append(errs, fmt.Errorf("RLIMIT_NOFILE: %w", err))
	} else {
		if rl.Cur+1 < rl.Max {
			raised := rl
			raised.Cur = rl.Max
			if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
				errs = append(errs, fmt.Errorf("raising RLIMIT_NOFILE from %d to %d: %w", rl.Cur, rl.Max, err))
			} else {
				rl = raised
			}
		}
		l.noFileSoft, l.noFileHard = uint64(rl.Cur), uint64(rl.Max)
	}
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var ok bool
		if l.portLow, l.portHigh, ok = parsePortRange(string(b)); !ok {
			errs = append(errs, fmt.Errorf("ip_local_port_range %q: want two port numbers", b))
		}
	}
	return l, errors.Join(errs...)
}
