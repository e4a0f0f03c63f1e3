import CVMMSys
import Glibc
import Synchronization
import HostSystem
import GuestMemory

/// Why KVM_RUN returned.
public enum KVMExit: Equatable, Sendable, CustomStringConvertible {
    /// Port IO; `data` holds what the guest wrote (for OUT) in its low `size` bytes.
    case io(port: UInt16, write: Bool, size: Int, data: UInt64)
    case mmio(GPA, write: Bool, size: Int, data: UInt64)
    case hlt
    case shutdown
    /// KVM_RUN returned EINTR (a signal, or immediate_exit).
    case interrupted
    /// This vCPU's dirty ring is full: harvest, reset, run again.
    case dirtyRingFull

    public var description: String {
        switch self {
        case let .io(p, w, s, d): return "port \(w ? "out" : "in") 0x\(String(p, radix: 16)) size \(s)" + (w ? " value 0x\(String(d, radix: 16))" : "")
        case let .mmio(g, w, s, d): return "MMIO \(w ? "write" : "read") \(g) size \(s)" + (w ? " value 0x\(String(d, radix: 16))" : "")
        case .hlt: return "hlt"
        case .shutdown: return "shutdown (triple fault)"
        case .interrupted: return "interrupted"
        case .dirtyRingFull: return "dirty ring full"
        }
    }
}

/// One KVM vCPU with its mmap'd kvm_run.
public final class KVMVCPU: @unchecked Sendable {   // KVM_RUN on its own thread; kicks are signals; kvm_run is shared with the kernel
    public let vm: KVMVM
    public let id: Int32
    let fd: FileDescriptor
    private let runArea: Mapping
    private let kvmRun: UnsafeMutablePointer<kvm_run>
    /// The vCPU's dirty ring, when the VM enabled rings before creating it.
    public let dirtyRing: KVMDirtyRing?

    init(vm: KVMVM, id: Int32) throws(KVMError) {
        self.vm = vm
        self.id = id
        let raw = cvmm_ioctl_value(vm.fd.raw, cvmm_KVM_CREATE_VCPU, UInt(id))
        guard raw >= 0 else { throw .ioctl("KVM_CREATE_VCPU(\(id))", errno: errno) }
        // Owned from here: a later failure closes and unmaps what was made.
        let fd = FileDescriptor(owning: raw)
        do {
            runArea = try Mapping(size: vm.system.vcpuMmapSize, flags: MAP_SHARED, fd: fd, what: "kvm_run")
        } catch { throw .ioctl(error.call, errno: error.errno) }
        kvmRun = runArea.base.bindMemory(to: kvm_run.self, capacity: 1)
        dirtyRing = vm.dirtyRingBytes > 0 ? try KVMDirtyRing(vcpu: fd, bytes: vm.dirtyRingBytes) : nil
        self.fd = fd
    }

    /// A vCPU state structure read with a KVM_GET_* ioctl (`name` for the error).
    func getState<T: BitwiseCopyable>(_ request: UInt, _ name: String, _ empty: T) throws(KVMError) -> T {
        var v = empty
        guard cvmm_ioctl(fd.raw, request, &v) == 0 else { throw .ioctl(name, errno: errno) }
        return v
    }

    /// A vCPU state structure written with a KVM_SET_* ioctl.
    func setState<T: BitwiseCopyable>(_ request: UInt, _ name: String, _ value: T) throws(KVMError) {
        var v = value
        guard cvmm_ioctl(fd.raw, request, &v) == 0 else { throw .ioctl(name, errno: errno) }
    }

    public func registers() throws(KVMError) -> kvm_regs { try getState(cvmm_KVM_GET_REGS, "KVM_GET_REGS", kvm_regs()) }
    public func setRegisters(_ regs: kvm_regs) throws(KVMError) { try setState(cvmm_KVM_SET_REGS, "KVM_SET_REGS", regs) }
    public func specialRegisters() throws(KVMError) -> kvm_sregs { try getState(cvmm_KVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs()) }
    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) { try setState(cvmm_KVM_SET_SREGS, "KVM_SET_SREGS", sregs) }

    /// Runs the vCPU until its next exit to user space and decodes it. Fatal exits (failed entry,
    /// internal error, anything unknown) throw with the vCPU's registers in the message.
    public func run() throws(KVMError) -> KVMExit {
        if cvmm_ioctl_value(fd.raw, cvmm_KVM_RUN, 0) != 0 {
            let e = errno
            if e == EINTR || e == EAGAIN { return .interrupted }
            throw .ioctl("KVM_RUN", errno: e)
        }
        let r = kvmRun.pointee
        switch Int32(r.exit_reason) {
        case KVM_EXIT_IO:
            let io = r.io
            let data = UnsafeRawPointer(kvmRun).advanced(by: Int(io.data_offset))
            var value: UInt64 = 0
            withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(start: data, count: min(8, Int(io.size)))) }
            return .io(port: io.port, write: io.direction == UInt8(KVM_EXIT_IO_OUT), size: Int(io.size), data: value)
        case KVM_EXIT_MMIO:
            let m = r.mmio
            var value: UInt64 = 0
            withUnsafeBytes(of: m.data) { d in withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: d[0..<min(8, Int(m.len))])) } }
            return .mmio(GPA(m.phys_addr), write: m.is_write != 0, size: Int(m.len), data: value)
        case KVM_EXIT_HLT:
            return .hlt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_DIRTY_RING_FULL:
            return .dirtyRingFull
        case KVM_EXIT_FAIL_ENTRY:
            throw .entryFailed(reason: r.fail_entry.hardware_entry_failure_reason, state: stateDump())
        case KVM_EXIT_INTERNAL_ERROR:
            throw .internalError(suberror: r.internal.suberror, state: stateDump())
        case let other:
            throw .unexpectedExit("exit reason \(other)", state: stateDump())
        }
    }

    /// Kicks this vCPU out of KVM_RUN from another thread: immediate_exit makes a run that has not
    /// started yet return at once, and the signal interrupts one in progress (EINTR).
    public func kick(thread: pthread_t) {
        kvmRun.pointee.immediate_exit = 1
        pthread_kill(thread, KVMVCPU.kickSignal)
    }

    /// Lets `kick` interrupt KVM_RUN on the calling thread (worker threads often start with signals
    /// blocked); returns the mask it replaced.
    @discardableResult
    public static func allowKicksOnThisThread() -> sigset_t {
        var set = sigset_t(), saved = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &set, &saved)
        return saved
    }

    /// Clears a previous kick before the next run.
    public func clearKick() {
        kvmRun.pointee.immediate_exit = 0
        // Ordered before the caller's next look at the stop and pause flags: a kick between the two
        // is then either seen in the flags or leaves immediate_exit set.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    /// SIGUSR1, with a handler that does nothing, installed once without SA_RESTART so KVM_RUN returns.
    static let kickSignal: Int32 = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(SIGUSR1, &action, nil)
        return SIGUSR1
    }()

    /// Registers and control state, for a readable diagnosis.
    public func stateDump() -> String {
        func h(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        var lines: [String] = []
        if let r = try? registers() {
            lines.append("  rip \(h(r.rip))  rsp \(h(r.rsp))  rflags \(h(r.rflags))")
            lines.append("  rax \(h(r.rax))  rbx \(h(r.rbx))  rcx \(h(r.rcx))  rdx \(h(r.rdx))")
            lines.append("  rsi \(h(r.rsi))  rdi \(h(r.rdi))  rbp \(h(r.rbp))")
        }
        if let s = try? specialRegisters() {
            lines.append("  cr0 \(h(s.cr0))  cr3 \(h(s.cr3))  cr4 \(h(s.cr4))  efer \(h(s.efer))")
            lines.append("  cs sel \(h(UInt64(s.cs.selector))) dpl \(s.cs.dpl) l \(s.cs.l)  ss sel \(h(UInt64(s.ss.selector))) dpl \(s.ss.dpl)")
        }
        return lines.joined(separator: "\n")
    }
}
