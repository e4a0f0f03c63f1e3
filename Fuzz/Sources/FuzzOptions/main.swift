import FuzzSupport
import GuestMemory
import Migration
import Workload

// The text options a user or a control-socket client passes: workload specs, memory layouts,
// addresses, link shapes, byte counts and durations. The first input byte picks the parser. What
// parses must print as text that parses back to the same value (the control socket and the
// migration stream carry these as text).

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    let text = String(decoding: UnsafeBufferPointer(start: data + 1, count: size - 1), as: UTF8.self)
    switch data[0] % 6 {
    case 0:
        if let s = try? WorkloadSpec.parse(text) {
            precondition((try? WorkloadSpec.parse(s.description)) == s, "\(s) does not parse back from its text")
        }
    case 1:
        if let l = try? RAMLayout(parsing: text) {
            precondition((try? RAMLayout(parsing: l.argument)) == l, "\(l) does not parse back from '\(l.argument)'")
        }
    case 2:
        if let a = try? MigrationAddress(parsing: text) {
            precondition((try? MigrationAddress(parsing: a.description)) == a, "\(a) does not parse back from its text")
        }
    case 3: _ = try? ShapedLink.Shape(parsing: text)
    case 4: _ = parseByteCount(text)
    default: _ = parseDuration(text)
    }
    return 0
}
