import CVMMSys
import Glibc
import GuestMemory

/// KVM's dirty bitmap: per-slot get and clear, manual protect, and the VMM's own writes merged in.
extension KVMVM {
    /// KVM_ENABLE_CAP on the VM.
    public func enable(_ cap: KVMCapability, _ args: UInt64...) throws(KVMError) {
        var e = kvm_enable_cap()
        e.cap = UInt32(cap.raw)
        withUnsafeMutableBytes(of: &e.args) { raw in
            for (i, a) in args.prefix(4).enumerated() { raw.storeBytes(of: a, toByteOffset: i * 8, as: UInt64.self) }
        }
        guard cvmm_ioctl(fd.raw, cvmm_KVM_ENABLE_CAP, &e) == 0 else { throw .ioctl("KVM_ENABLE_CAP(\(cap.name))", errno: errno) }
    }

    /// Sets manual dirty-log protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) on or off, with
    /// initially-all-set or not. Takes effect for slots whose logging starts afterwards: change it
    /// only while no slot logs.
    public func setManualProtect(_ on: Bool, initiallySet: Bool = false) throws(KVMError) {
        if !on && !manualProtect { return }
        try system.require(.manualDirtyLogProtect2)
        // Bit 0: manual protect; bit 1: initially all set.
        try enable(.manualDirtyLogProtect2, on ? (initiallySet ? 3 : 1) : 0)
        manualProtect = on
    }

    /// Turns on manual protect, optionally with initially-all-set.
    public func enableManualProtect(initiallySet: Bool) throws(KVMError) {
        try setManualProtect(true, initiallySet: initiallySet)
    }

    /// KVM_CLEAR_DIRTY_LOG: forgets and re-protects the pages `bitmap` names, bit 0 being page
    /// `firstPage` (a multiple of 64) of the slot; the VMM's own log forgets them too.
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, bitmap: [UInt64]) throws(KVMError) {
        try withSlots { (slots) throws(KVMError) in
            guard let slotPages = slots[slot].map({ $0.memory.size >> 12 }), firstPage < slotPages else {
                throw .refused("clear of pages from \(firstPage) is outside memslot \(slot)")
            }
            var words = bitmap
            let rc = words.withUnsafeMutableBytes { buf -> Int32 in
                var c = kvm_clear_dirty_log()
                c.slot = slot
                // KVM wants the count to end at the slot's end when it is not a multiple of 64.
                c.num_pages = UInt32(min(UInt64(bitmap.count) * 64, slotPages - firstPage))
                c.first_page = firstPage
                c.dirty_bitmap = buf.baseAddress
                return cvmm_ioctl(fd.raw, cvmm_KVM_CLEAR_DIRTY_LOG, &c)
            }
            guard rc == 0 else { throw .ioctl("KVM_CLEAR_DIRTY_LOG(slot \(slot), pages \(firstPage)+\(bitmap.count * 64))", errno: errno) }
            // Under the lock too: a VMM write (which takes it) landing between the clear and this
            // would otherwise be forgotten unreported.
            vmmWrites.forget(slot: Int(slot), bitmap: bitmap, firstPage: firstPage)
        }
    }

    /// KVM_GET_DIRTY_LOG for `slot`: the bitmap (bit i of word w = page 64w+i), which KVM clears and
    /// re-protects as it returns it (or, under manual protect, keeps until a clear), with the pages the
    /// VMM wrote itself merged in. Sized and fetched under the slot lock: KVM writes one bit per page
    /// of the slot as it is at the call, so a slot re-created larger in between must not be reached.
    public func getDirtyLog(slot: UInt32) throws(KVMError) -> [UInt64] {
        try withSlots { (slots) throws(KVMError) -> [UInt64] in
            guard let memory = slots[slot]?.memory else { throw .refused("memslot \(slot) does not exist") }
            var words = [UInt64](repeating: 0, count: Int((memory.size >> 12 + 63) / 64))
            let rc = words.withUnsafeMutableBytes { buf -> Int32 in
                var log = kvm_dirty_log()
                log.slot = slot
                log.dirty_bitmap = buf.baseAddress
                return cvmm_ioctl(fd.raw, cvmm_KVM_GET_DIRTY_LOG, &log)
            }
            guard rc == 0 else { throw .ioctl("KVM_GET_DIRTY_LOG(slot \(slot))", errno: errno) }
            takeVMMDirty(slot: slot, into: &words)
            return words
        }
    }
}
