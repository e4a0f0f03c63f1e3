import Glibc

/// An open file descriptor, owned: closed exactly once, when its owner goes. Not copyable, so no
/// second owner can close it under the first; the number itself is visible only inside this package.
public struct FileDescriptor: ~Copyable, Sendable {
    package let raw: Int32

    /// Takes ownership of `raw` (a descriptor the caller just opened and will not close).
    package init(owning raw: Int32) {
        precondition(raw >= 0, "a file descriptor is not negative")
        self.raw = raw
    }

    /// Opens `path`.
    package init(opening path: String, _ flags: Int32, mode: mode_t = 0) throws(SystemCallError) {
        raw = try system("open(\(path))") { open(path, flags | O_CLOEXEC, mode) }
    }

    deinit { close(raw) }
}
