package config

import (
	"errors"
	"fmt"
	"math"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

// Policy names what a queue does above its high-water mark. It mirrors
// limiter.Policy; convert with limiter.ParsePolicy(string(p)).
type Policy string

// Policies accepted in SLUICE_POLICY.
const (
	PolicyEvict Policy = "evict"
	PolicyDrop  Policy = "drop"
	PolicyPause Policy = "pause"
)

// UnmarshalText accepts evict, drop or pause in any case.
func (p *Policy) UnmarshalText(text []byte) error {
	v := Policy(strings.ToLower(string(text)))
	if !v.valid() {
		return fmt.Errorf("config: unknown policy %q (want evict, drop or pause)", text)
	}
	*p = v
	return nil
}

func (p Policy) valid() bool {
	return p == PolicyEvict || p == PolicyDrop || p == PolicyPause
}

// RatePolicy names what happens to a client over its inbound limit. It
// mirrors limiter.RatePolicy; convert with limiter.ParseRatePolicy.
type RatePolicy string

// Rate policies accepted in SLUICE_CLIENT_RATE_POLICY.
const (
	RateThrottle RatePolicy = "throttle"
	RateClose    RatePolicy = "close"
)

// UnmarshalText accepts throttle or close in any case.
func (p *RatePolicy) UnmarshalText(text []byte) error {
	v := RatePolicy(strings.ToLower(string(text)))
	if !v.valid() {
		return fmt.Errorf("config: unknown rate policy %q (want throttle or close)", text)
	}
	*p = v
	return nil
}

func (p RatePolicy) valid() bool { return p == RateThrottle || p == RateClose }

// ByteSize is a number of bytes, written in the environment as a plain
// integer or an integer followed by a unit, with no space:
//
//	B             1
//	KiB MiB GiB   1024, 1024², 1024³ (binary)
//	KB  MB  GB    1000, 1000², 1000³ (SI)
//
// Units are case-insensitive ASCII, so 64kib is 64KiB but 64kb is 64000
// bytes. Negative numbers, fractions, other units (K, TiB), surrounding or
// inner whitespace and values above math.MaxInt64 are rejected.
type ByteSize int64

// Binary byte-size units.
const (
	KiB ByteSize = 1 << 10
	MiB ByteSize = 1 << 20
	GiB ByteSize = 1 << 30
)

var byteUnits = []struct {
	name string // lower case
	mult ByteSize
}{
	{"", 1}, {"b", 1},
	{"kib", KiB}, {"mib", MiB}, {"gib", GiB},
	{"kb", 1000}, {"mb", 1000 * 1000}, {"gb", 1000 * 1000 * 1000},
}

const byteSizeForm = "want a whole number of bytes with an optional unit B, KiB, MiB, GiB, KB, MB or GB, such as 65536, 64KiB or 10MiB"

// ParseByteSize parses a size such as 65536, 64KiB, 10MiB or 1GB; see
// ByteSize for the grammar.
func ParseByteSize(s string) (ByteSize, error) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	digits, unit := s[:i], s[i:]
	switch {
	case strings.TrimSpace(s) == "":
		return 0, fmt.Errorf("config: empty size: %s", byteSizeForm)
	case digits == "" && s[0] == '-':
		return 0, fmt.Errorf("config: negative size %q: %s", s, byteSizeForm)
	case digits == "":
		return 0, fmt.Errorf("config: size %q does not start with a number: %s", s, byteSizeForm)
	case unit != "" && (unit[0] == '.' || unit[0] == ','):
		return 0, fmt.Errorf("config: fractional size %q: %s", s, byteSizeForm)
	}
	mult := ByteSize(0)
	for _, u := range byteUnits {
		if asciiEqualFold(unit, u.name) {
			mult = u.mult
			break
		}
	}
	if mult == 0 {
		return 0, fmt.Errorf("config: size %q has an unknown unit %q: %s", s, unit, byteSizeForm)
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || ByteSize(n) > math.MaxInt64/mult {
		return 0, fmt.Errorf("config: size %q is too large (at most %d bytes)", s, int64(math.MaxInt64))
	}
	return ByteSize(n) * mult, nil
}

// asciiEqualFold is strings.EqualFold without Unicode folding, so that the
// Kelvin sign does not pass for a k.
func asciiEqualFold(s, lower string) bool {
	if len(s) != len(lower) {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// String renders the most compact exact binary form, which ParseByteSize
// reads back: 10485760 is "10MiB", 1536 is "1536" (not 1.5KiB), 0 is "0".
func (b ByteSize) String() string {
	if b != 0 {
		for _, u := range []struct {
			suffix string
			mult   ByteSize
		}{{"GiB", GiB}, {"MiB", MiB}, {"KiB", KiB}} {
			if b%u.mult == 0 {
				return strconv.FormatInt(int64(b/u.mult), 10) + u.suffix
			}
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// MarshalText renders String, so sizes log readably.
func (b ByteSize) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// UnmarshalText parses with ParseByteSize.
func (b *ByteSize) UnmarshalText(text []byte) error {
	v, err := ParseByteSize(string(text))
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// GlobalQueueLimit is the ceiling on bytes queued across all connections:
// an absolute size, or a percentage of the process memory limit so that
// one setting fits containers of every size. Exactly one of the fields is
// non-zero in a valid limit.
//
// The env:"-" tags matter: caarlos0/env descends into struct fields after
// UnmarshalText and would otherwise fill these from the bare variable
// "SLUICE_".
type GlobalQueueLimit struct {
	// Bytes is the absolute ceiling, when Percent is 0.
	Bytes ByteSize `env:"-"`
	// Percent of the memory limit, in (0, 100].
	Percent float64 `env:"-"`
}

// ParseGlobalQueueLimit reads a positive ByteSize ("512MiB") or a
// percentage above 0% and up to 100% written with digits and at most one
// decimal point ("5%", "2.5%").
func ParseGlobalQueueLimit(s string) (GlobalQueueLimit, error) {
	num, ok := strings.CutSuffix(s, "%")
	if !ok {
		b, err := ParseByteSize(s)
		if err != nil {
			return GlobalQueueLimit{}, err
		}
		if b == 0 {
			return GlobalQueueLimit{}, errors.New("config: global queue limit must be above 0")
		}
		return GlobalQueueLimit{Bytes: b}, nil
	}
	intPart, frac, hasPoint := strings.Cut(num, ".")
	if !allDigits(intPart) || (hasPoint && !allDigits(frac)) {
		return GlobalQueueLimit{}, fmt.Errorf("config: percentage %q: want digits such as 5%% or 2.5%%", s)
	}
	p, err := strconv.ParseFloat(num, 64)
	if err != nil || !(p > 0 && p <= 100) {
		return GlobalQueueLimit{}, fmt.Errorf("config: percentage %q: want above 0%% and up to 100%%", s)
	}
	return GlobalQueueLimit{Percent: p}, nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func (g GlobalQueueLimit) valid() bool {
	if g.Percent != 0 {
		return g.Percent > 0 && g.Percent <= 100 && g.Bytes == 0
	}
	return g.Bytes > 0
}

// Resolve returns the ceiling in bytes given the process memory limit
// (MemoryLimit()). For a percentage it returns at least 1, or 0 when
// memLimit is not positive: with no known memory limit there is nothing to
// take a percentage of, and the caller should run without a global
// ceiling and log that it does.
func (g GlobalQueueLimit) Resolve(memLimit int64) int64 {
	if g.Percent == 0 {
		return int64(g.Bytes)
	}
	if memLimit <= 0 {
		return 0
	}
	f := float64(memLimit) * g.Percent / 100
	if f >= math.MaxInt64 { // float64(MaxInt64) is 2^63, which int64 cannot hold
		return math.MaxInt64
	}
	return max(int64(f), 1)
}

// String renders the form ParseGlobalQueueLimit reads: "5%" or "512MiB".
func (g GlobalQueueLimit) String() string {
	if g.Percent != 0 {
		return strconv.FormatFloat(g.Percent, 'f', -1, 64) + "%"
	}
	return g.Bytes.String()
}

// MarshalText renders String.
func (g GlobalQueueLimit) MarshalText() ([]byte, error) { return []byte(g.String()), nil }

// UnmarshalText parses with ParseGlobalQueueLimit.
func (g *GlobalQueueLimit) UnmarshalText(text []byte) error {
	v, err := ParseGlobalQueueLimit(string(text))
	if err != nil {
		return err
	}
	*g = v
	return nil
}

// MemoryLimit is the memory the process may use, the base of a percentage
// GlobalQueueLimit: the Go memory limit when one is set (GOMEMLIMIT, or
// memlimit.Set in main, which derives it from the cgroup), else the cgroup
// limit, else total system memory, else 0 (unknown).
func MemoryLimit() int64 {
	if l := debug.SetMemoryLimit(-1); l > 0 && l < math.MaxInt64 {
		return l
	}
	for _, source := range []func() (uint64, error){memlimit.FromCgroup, memlimit.FromSystem} {
		if l, err := source(); err == nil && l > 0 {
			return int64(min(l, math.MaxInt64))
		}
	}
	return 0
}
