package config

import (
	"errors"
	"fmt"
	"math"
	"net/url"
	"reflect"
	"slices"
	"strings"

	"github.com/caarlos0/env/v11"
)

// fieldInfo describes one field of Config, from its tags.
type fieldInfo struct {
	index int    // position in Config
	name  string // Go field name
	key   string // variable name with prefix
	want  string // allowed form, for messages
}

var configFields, fieldsByName = describeConfig()

func describeConfig() ([]fieldInfo, map[string]fieldInfo) {
	t := reflect.TypeFor[Config]()
	list := make([]fieldInfo, 0, t.NumField())
	byName := make(map[string]fieldInfo, t.NumField())
	for i := range t.NumField() {
		sf := t.Field(i)
		name, _, _ := strings.Cut(sf.Tag.Get("env"), ",")
		f := fieldInfo{index: i, name: sf.Name, key: Prefix + name, want: sf.Tag.Get("want")}
		list = append(list, f)
		byName[sf.Name] = f
	}
	return list, byName
}

// checker collects problems. It remembers which fields are bad (failed to
// parse or failed a rule) so that rules involving them are skipped rather
// than reported twice.
type checker struct {
	raw      map[string]string // the environment, nil when validating a Config built in code
	bad      map[string]bool   // Go field names
	problems []Problem
}

func newChecker(raw map[string]string) *checker {
	return &checker{raw: raw, bad: map[string]bool{}}
}

func (c *checker) add(p Problem) {
	p.Value = redact(p.Value)
	c.problems = append(c.problems, p)
}

func (c *checker) err() error {
	slices.SortStableFunc(c.problems, func(a, b Problem) int { return a.order - b.order })
	return &Error{Problems: c.problems}
}

func (c *checker) anyBad(names ...string) bool {
	for _, n := range names {
		if _, ok := fieldsByName[n]; !ok {
			panic("config: no field " + n) // a typo in check; tests catch it
		}
		if c.bad[n] {
			return true
		}
	}
	return false
}

// show renders a field's value: as the user wrote it when it came from the
// environment, else from the parsed value.
func (c *checker) show(name string, value any) string {
	if s := c.raw[fieldsByName[name].key]; s != "" {
		return s
	}
	return fmt.Sprint(value)
}

// ref names another field and its value, for cross-field messages.
func (c *checker) ref(name string, value any) string {
	return fmt.Sprintf("%s (%s)", fieldsByName[name].key, redact(c.show(name, value)))
}

// field reports name as bad unless ok.
func (c *checker) field(name string, ok bool, value any) {
	if c.anyBad(name) || ok {
		return
	}
	f := fieldsByName[name]
	c.bad[name] = true
	c.add(Problem{Var: f.key, Value: c.show(name, value), Msg: "want " + f.want, order: f.index})
}

// list checks each entry of a list variable with valid and reports name as
// bad at the first entry that fails, quoting why.
func (c *checker) list(name string, entries []string, valid func(string) error) {
	if c.anyBad(name) {
		return
	}
	for _, e := range listEntries(entries) {
		if err := valid(e); err != nil {
			f := fieldsByName[name]
			c.bad[name] = true
			c.add(Problem{Var: f.key, Value: c.show(name, entries), Msg: "want " + f.want + "; " + err.Error(), order: f.index})
			return
		}
	}
}

// listEntries trims the entries of a comma-separated variable and drops
// empty ones, so that "a, b," means [a b].
func listEntries(entries []string) []string {
	var out []string
	for _, e := range entries {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// cross reports name as conflicting with other unless ok; msg has one %s
// for the other field and its value. It is skipped when either field is
// bad, since that is already reported.
func (c *checker) cross(ok bool, name string, value any, other string, otherValue any, msg string) {
	if ok || c.anyBad(name, other) {
		return
	}
	f := fieldsByName[name]
	c.add(Problem{Var: f.key, Value: c.show(name, value), Msg: fmt.Sprintf(msg, c.ref(other, otherValue)), order: f.index})
}

// parseError rewrites one error of env.AggregateError into a Problem.
func (c *checker) parseError(err error) {
	var pe env.ParseError
	var unset env.VarIsNotSetError
	var empty env.EmptyVarError
	switch {
	case errors.As(err, &pe):
		f, ok := fieldsByName[pe.Name]
		if !ok {
			break
		}
		c.bad[f.name] = true
		c.add(Problem{Var: f.key, Value: c.rawOrDefault(f), Msg: "want " + f.want, order: f.index})
		return
	case errors.As(err, &unset):
		c.add(Problem{Var: unset.Key, Msg: "required", order: c.orderOf(unset.Key)})
		return
	case errors.As(err, &empty):
		c.add(Problem{Var: empty.Key, Msg: "must not be empty", order: c.orderOf(empty.Key)})
		return
	}
	c.add(Problem{Msg: "config: " + err.Error()})
}

func (c *checker) rawOrDefault(f fieldInfo) string {
	if s := c.raw[f.key]; s != "" {
		return s
	}
	sf, _ := reflect.TypeFor[Config]().FieldByName(f.name)
	return sf.Tag.Get("envDefault")
}

func (c *checker) orderOf(key string) int {
	for _, f := range configFields {
		if f.key == key {
			return f.index
		}
	}
	return len(configFields)
}

// unknownVars reports SLUICE_* variables that are not fields of Config,
// compared case-insensitively, with the closest known name: a typo
// otherwise silently leaves the default in place.
func (c *checker) unknownVars(environ map[string]string) {
	known := make(map[string]bool, len(configFields))
	for _, f := range configFields {
		known[f.key] = true
	}
	var unknown []string
	for k := range environ {
		if len(k) >= len(Prefix) && strings.EqualFold(k[:len(Prefix)], Prefix) && !known[k] {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		msg := "unknown variable; config.example.env lists the known ones"
		if r := retired(strings.ToUpper(k)); r != "" {
			msg = r
		} else if s := suggest(k); s != "" {
			msg = "unknown variable; did you mean " + s + "?"
		}
		c.add(Problem{Var: k, Value: environ[k], Msg: msg, order: len(configFields)})
	}
}

// retired says what replaced a variable sluice once read, "" for any
// other: left in a deployment, it would otherwise silently do nothing.
func retired(name string) string {
	switch name {
	case Prefix + "SLOW_CLIENT_DEPTH":
		return "no longer read: a client is slow when it stops taking bytes, not when its queue is deep; set " +
			Prefix + "SLOW_CLIENT_AGE (a duration such as 5s) instead"
	}
	return ""
}

// suggest returns the known variable closest to name, or "" when none is
// close. Distance is the edit distance, also tried with the words between
// underscores sorted so that SLUICE_MAX_QUEUE_BYTES finds
// SLUICE_QUEUE_MAX_BYTES; a name contained in a known one also matches.
func suggest(name string) string {
	u := strings.ToUpper(name[len(Prefix):])
	best, bestD := "", math.MaxInt
	for _, f := range configFields {
		k := f.key[len(Prefix):]
		d := min(editDistance(u, k), editDistance(sortWords(u), sortWords(k)))
		near := d <= max(2, len(u)/3) || (len(u) >= 4 && (strings.Contains(k, u) || strings.Contains(u, k)))
		if near && d < bestD {
			best, bestD = f.key, d
		}
	}
	return best
}

func sortWords(s string) string {
	w := strings.Split(s, "_")
	slices.Sort(w)
	return strings.Join(w, "_")
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// redact hides the password of anything that looks like a URL with user
// info, so that error messages and logs do not leak it.
func redact(s string) string {
	if u, err := url.Parse(s); err == nil && u.User != nil {
		return u.Redacted()
	}
	// Unparsable: cut the user info out by hand.
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return s
	}
	authority, path, _ := strings.Cut(rest, "/")
	at := strings.LastIndexByte(authority, '@')
	if at < 0 || !strings.Contains(authority[:at], ":") {
		return s
	}
	user, _, _ := strings.Cut(authority[:at], ":")
	out := scheme + "://" + user + ":xxxxx" + authority[at:]
	if len(rest) > len(authority) {
		out += "/" + path
	}
	return out
}
