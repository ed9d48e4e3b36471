import type { Command } from 'commander';
import type { Action } from '../main';
import { register as init } from './init';
import { register as initdb } from './initdb';
import { register as backup } from './backup';
import { register as restore } from './restore';
import { register as ls } from './ls';
import { register as scrub } from './scrub';
import { register as rm } from './rm';
import { register as protect } from './protect';
import { register as unprotect } from './unprotect';
import { register as cleanup } from './cleanup';
import { register as stats } from './stats';
import { register as addTag } from './add-tag';
import { register as removeTag } from './remove-tag';
import { register as expire } from './expire';
import { register as nbd } from './nbd';
import { register as mount } from './mount';
import { register as umount } from './umount';
import { register as dbMigrate } from './db-migrate';
import { register as dbRebuild } from './db-rebuild';
import { register as importBacky2 } from './import-backy2';
import { register as exportCmd } from './export';
import { register as importCmd } from './import';
import { register as overlay } from './overlay';
import { register as fixate } from './fixate';
import { register as due } from './due';
import { register as sla } from './sla';
import { register as enforce } from './enforce';
import { register as du } from './du';
import { register as diffMeta } from './diff-meta';

export type Register = (program: Command, wrap: (fn: Action) => (...args: unknown[]) => Promise<void>) => void;

/** Every command, in the order `backy --help` lists them. */
export const commands: Register[] = [init, initdb, backup, restore, ls, scrub, rm, protect, unprotect, cleanup, stats, addTag, removeTag, expire, nbd, mount, umount, overlay, fixate, dbMigrate,
  due, sla, enforce, du, diffMeta, dbRebuild, importBacky2, exportCmd, importCmd];
