import { BlockDevice, capabilitiesOf, DeviceCapabilities, DeviceError, Extent, WriteOptions, ZeroOptions } from './types';

/**
 * The base of every device layer (nbdkit's `next_ops`): forwards each operation to the device below, so a
 * layer overrides only what it changes and never drops what it does not know about (a write, a flush, a
 * capability). Operations the device below lacks fail as they would there: writes with EPERM (read-only),
 * zero/trim with ENOTSUP; flush and prefetch are then no-ops.
 */
export class PassThroughDevice implements BlockDevice {
  constructor(protected readonly next: BlockDevice) {}

  get size(): number {
    return this.next.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.next.read(offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }

  prefetch(offset: number, length: number): Promise<void> {
    return this.next.prefetch ? this.next.prefetch(offset, length) : Promise.resolve();
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (!this.next.write) return Promise.reject(new DeviceError('the device is read-only', 'EPERM', offset));
    return this.next.write(offset, data, opts);
  }

  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!this.next.zero) return Promise.reject(unsupported('zero', this.next, offset));
    return this.next.zero(offset, length, opts);
  }

  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (!this.next.trim) return Promise.reject(unsupported('trim', this.next, offset));
    return this.next.trim(offset, length, opts);
  }

  flush(): Promise<void> {
    return this.next.flush ? this.next.flush() : Promise.resolve();
  }

  capabilities(): DeviceCapabilities {
    return capabilitiesOf(this.next);
  }

  close(): Promise<void> {
    return this.next.close ? this.next.close() : Promise.resolve();
  }
}

function unsupported(op: string, d: BlockDevice, offset: number): DeviceError {
  return d.write ? new DeviceError(`the device does not support ${op}`, 'ENOTSUP', offset) : new DeviceError('the device is read-only', 'EPERM', offset);
}
