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

/// Every system call of the project goes through this: it retries what a signal interrupted
/// (EINTR), reads errno at once (before anything else can change it), and throws an error that
/// names the call. `call` describes the call lazily: it is built only on failure. `body` returns
/// what the call does (an Int32 status or descriptor, an Int size), negative on failure.
@inlinable
package func system<Result: SignedInteger>(_ call: @autoclosure () -> String, _ body: () -> Result) throws(SystemCallError) -> Result {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e != EINTR { throw SystemCallError(call(), errno: e) }
    }
}
