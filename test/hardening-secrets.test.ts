/**
 * A PostgreSQL password never shows: not as user:password@ and not as ?password= in the engine URL, not in
 * initdb's output, logs or error lines.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { startPostgres, TestPostgres } from './helpers/postgres';
import { enginePasswords, maskEngineUrl } from '../src/util/secrets';

const SECRET = 'S3cret pw&x/y';
const ENCODED = encodeURIComponent(SECRET);

describe('PostgreSQL passwords in engine URLs', () => {
  let pg: TestPostgres;
  const repos: TestRepo[] = [];
  before(async () => {
    pg = await startPostgres();
    await pg.query(`CREATE ROLE backy_pw LOGIN PASSWORD '${SECRET}'`);
  });
  after(async () => {
    for (const r of repos) r.cleanup();
    await pg?.stop();
  });

  function everything(repo: TestRepo, out: { stdout: string; stderr: string }): string {
    const logfile = path.join(repo.dir, 'backy.log');
    return out.stdout + out.stderr + (fs.existsSync(logfile) ? fs.readFileSync(logfile, 'utf8') : '');
  }

  function assertNoSecret(text: string): void {
    for (const form of [SECRET, ENCODED, 'S3cret']) assert.ok(!text.includes(form), `"${form}" appears in:\n${text}`);
  }

  test('masked in initdb output, logs and errors, as ?password= and as user:password@', async () => {
    const database = async () => {
      const name = (await pg.createDatabase()).split('/').pop()!;
      await pg.query(`ALTER DATABASE ${name} OWNER TO backy_pw`);
      return name;
    };
    const db = await database();
    for (const engine of [
      `postgresql://backy_pw@127.0.0.1:${pg.port}/${db}?password=${ENCODED}&application_name=t`,
      `postgresql://backy_pw:${ENCODED}@127.0.0.1:${pg.port}/${await database()}`,
    ]) {
      const repo = makeTestRepo(`[MetaBackend]\nengine = ${engine}\n`);
      repos.push(repo);
      const init = await repo.run(['-v', 'initdb']);
      assert.equal(init.code, 0, init.stderr);
      assert.match(init.stderr, /postgresql:\/\/backy_pw(:\*\*\*)?@127\.0\.0\.1:\d+\/\w+(\?password=\*\*\*&application_name=t)?/);
      assertNoSecret(everything(repo, init));
      const ls = await repo.run(['-v', 'ls']);
      assert.equal(ls.code, 0, ls.stderr);
      assertNoSecret(everything(repo, ls));
    }
    // A wrong password: one line, without it.
    const wrong = makeTestRepo(`[MetaBackend]\nengine = postgresql://backy_pw@127.0.0.1:${pg.port}/${db}?password=${ENCODED}-wrong\n`);
    repos.push(wrong);
    const r = await wrong.run(['ls']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /refused the password of user "backy_pw"/);
    assertNoSecret(everything(wrong, r));
    // An engine URL the configuration cannot use at all is quoted masked.
    const typo = makeTestRepo(`[MetaBackend]\nengine = postgresq://backy_pw:${ENCODED}@127.0.0.1/${db}?sslpassword=${ENCODED}\n`);
    repos.push(typo);
    const t = await typo.run(['ls']);
    assert.equal(t.code, 1);
    assert.match(t.stderr, /invalid \[MetaBackend\] engine = "postgresq:\/\/backy_pw:\*\*\*@127\.0\.0\.1\/\w+\?sslpassword=\*\*\*"/);
    assertNoSecret(everything(typo, t));
  });

  test('maskEngineUrl and enginePasswords cover every form', () => {
    assert.equal(maskEngineUrl('postgresql://u:p%40ss@h:5/db?password=x%20y&sslmode=require&sslpassword=z'),
      'postgresql://u:***@h:5/db?password=***&sslmode=require&sslpassword=***');
    assert.equal(maskEngineUrl('postgresql://h/db?sslmode=require'), 'postgresql://h/db?sslmode=require');
    assert.deepEqual(new Set(enginePasswords('postgresql://u:p%40ss@h/db?password=x+y%21')), new Set(['p%40ss', 'p@ss', 'x+y%21', 'x y!', 'x+y!']));
  });
});
