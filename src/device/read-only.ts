import { PassThroughDevice } from './pass-through';
import { DeviceCapabilities, DeviceError, WriteOptions, ZeroOptions } from './types';

/** A writable device served read-only: writes fail with EPERM, capabilities say so; reads pass through. */
export class ReadOnlyDevice extends PassThroughDevice {
  override write(offset: number, _data?: Buffer, _opts?: WriteOptions): Promise<void> {
    return Promise.reject(new DeviceError('the device is read-only', 'EPERM', offset));
  }

  override zero(offset: number, _length?: number, _opts?: ZeroOptions): Promise<void> {
    return this.write(offset);
  }

  override trim(offset: number, _length?: number, _opts?: WriteOptions): Promise<void> {
    return this.write(offset);
  }

  override flush(): Promise<void> {
    return Promise.resolve();
  }

  override capabilities(): DeviceCapabilities {
    return { ...super.capabilities(), write: false, zero: false, trim: false, flush: false, fua: false, fastZero: false };
  }
}
