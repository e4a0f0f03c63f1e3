import Glibc

/// A system call that failed: which, with what, and the errno it left.
public struct SystemCallError: Error, Equatable, CustomStringConvertible {
    /// The call and its arguments as a reader needs them, e.g. `mmap(64 MiB)` or `KVM_CREATE_VCPU(1)`.
    public let call: String
    public let errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// Every system call of the project goes through one of these: they retry what a signal
/// interrupted (EINTR), read errno at once (before anything else can change it), and throw an
/// error that names the call. `call` describes the call lazily: it is built only on failure.
@inlinable
package func system(_ call: @autoclosure () -> String, _ body: () -> Int32) throws(SystemCallError) -> Int32 {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e != EINTR { throw SystemCallError(call(), errno: e) }
    }
}

/// The same for calls that return a size (read, write, send, recv).
@inlinable
package func system(_ call: @autoclosure () -> String, _ body: () -> Int) throws(SystemCallError) -> Int {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e != EINTR { throw SystemCallError(call(), errno: e) }
    }
}
