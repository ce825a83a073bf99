// Package limiter owns the bounded queues between a proxy's two legs, their
// water marks and overflow policies, and the process-wide budget that keeps
// the sum of all queues under a ceiling.
//
// A Queue carries the frames waiting to be written to one socket: a priority
// lane of control frames, which the writer always takes first, and a data
// lane of whole frames in arrival order. The producer (the reader of the
// other leg) pushes; whoever holds the socket's write token takes. Nothing
// here does I/O and no lock is held by anyone doing I/O.
package limiter
