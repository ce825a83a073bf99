package frame

import "github.com/gobwas/ws"

// Close codes that gobwas/ws does not define. All three are registered with
// IANA (RFC 6455 §11.7).
const (
	StatusServiceRestart ws.StatusCode = 1012
	StatusTryAgainLater  ws.StatusCode = 1013
	StatusBadGateway     ws.StatusCode = 1014
)

// ValidCloseCode reports whether code may appear in a close frame on the
// wire. 1005, 1006 and 1015 are for local reporting only, 1004 and
// 1016–2999 are reserved, and anything outside 1000–4999 is invalid.
func ValidCloseCode(code ws.StatusCode) bool {
	switch {
	case code >= 1000 && code <= 1003:
		return true
	case code >= 1007 && code <= 1014:
		return true
	case code >= 3000 && code <= 4999:
		return true
	}
	return false
}
