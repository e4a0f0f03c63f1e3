import Glibc

/// What can go wrong talking to /dev/kvm, each with what to do about it.
public enum KVMError: Error, Equatable, CustomStringConvertible {
    case noDevice(String)
    case permissionDenied(String)
    case apiVersion(Int32)
    case capabilityMissing(String)
    case ioctl(String, errno: Int32)
    case entryFailed(reason: UInt64, state: String)
    case internalError(suberror: UInt32, state: String)
    case unexpectedExit(String, state: String)
    case badWorkload(String)
    case timedOut(seconds: Double, state: String)
    /// A call this VM's memslots or KVM's rules refuse; the text says why and what to do.
    case refused(String)

    public var description: String {
        switch self {
        case let .noDevice(path):
            return "\(path) does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm), or use --backend soft"
        case let .permissionDenied(path):
            return "permission denied opening \(path): run as root or add yourself to the kvm group"
        case let .apiVersion(v):
            return "KVM API version \(v), expected 12: this kernel's KVM is not supported"
        case let .capabilityMissing(name):
            return "KVM lacks \(name) on this host"
        case let .ioctl(name, e):
            return "\(name) failed: \(String(cString: strerror(e))) (errno \(e))"
        case let .entryFailed(reason, state):
            return "the guest failed to enter (hardware reason 0x\(String(reason, radix: 16))):\n\(state)"
        case let .internalError(sub, state):
            return "KVM internal error (suberror \(sub)), the guest cannot continue:\n\(state)"
        case let .unexpectedExit(what, state):
            return "unexpected exit: \(what)\n\(state)"
        case let .timedOut(seconds, state):
            return "the guest did not finish within \(seconds) s; it was stopped here:\n\(state)"
        case let .badWorkload(why):
            return "workload not runnable by the guest program: \(why)"
        case let .refused(why):
            return why
        }
    }
}
