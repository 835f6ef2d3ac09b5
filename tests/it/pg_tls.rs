//! TLS to the source with libpq's sslmode semantics. The test server's certificate is signed by
//! a throwaway CA for the name `localhost` only, and the role `kuaka_tls` is admitted only over
//! TLS (`hostssl` + `hostnossl ... reject`), so a successful copy proves the connection used TLS.

use crate::support::postgres::{MD5_ROLE, PASSWORD_ROLE_PASSWORD, TLS_ROLE};
use crate::support::{assert_same_data, kuaka, pg, psql, run};

struct TlsJob {
    source_db: String,
    target: String,
}

fn setup(name: &str) -> TlsJob {
    let source_db = format!("{name}_src");
    let source = pg().create_db(&source_db);
    psql(
        &source,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 500) i;",
    );
    let target = pg().create_db(&format!("{name}_dst"));
    TlsJob { source_db, target }
}

impl TlsJob {
    fn source_url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://{TLS_ROLE}@{host}:{}/{}{params}",
            pg().port,
            self.source_db
        )
    }

    fn copy(&self, source: &str) -> crate::support::RunOutput {
        let state = tempfile::tempdir().expect("state dir");
        let mut command = kuaka();
        command
            .args([
                "run",
                "--snapshot-only",
                "--source",
                source,
                "--target",
                &self.target,
            ])
            .arg("--state")
            .arg(state.path())
            .arg("--target-exists")
            .arg("drop");
        run(command)
    }
}

#[test]
fn tls_modes_that_should_connect_do() {
    let job = setup("tls_ok");
    let ca = pg().ca_file();
    let ca = ca.to_str().expect("utf-8 path");
    for params in [
        String::new(), // default: prefer, and the server insists on TLS for this role
        "?sslmode=prefer".to_owned(),
        "?sslmode=require".to_owned(),
        format!("?sslmode=verify-ca&sslrootcert={ca}"),
    ] {
        job.copy(&job.source_url("127.0.0.1", &params))
            .assert_success();
        assert_same_data(
            &job.source_url("127.0.0.1", "?sslmode=require"),
            &job.target,
        );
    }
    // verify-full needs the name on the certificate.
    job.copy(&job.source_url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .assert_success();
}

#[test]
fn tls_modes_that_should_refuse_do() {
    let job = setup("tls_refused");
    let ca = pg().ca_file();
    let ca = ca.to_str().expect("utf-8 path");
    // No TLS: pg_hba rejects the role.
    let out = job.copy(&job.source_url("127.0.0.1", "?sslmode=disable"));
    out.assert_exit_code(2);
    assert!(out.stderr.contains("pg_hba"), "{}", out.stderr);
    // The certificate is for localhost, not 127.0.0.1.
    let out = job.copy(&job.source_url(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ));
    out.assert_exit_code(2);
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.stderr
    );
    // The test CA is not among the system's trusted roots.
    let out = job.copy(&job.source_url("localhost", "?sslmode=verify-full"));
    out.assert_exit_code(2);
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.stderr
    );
    // A root certificate file that does not exist is named.
    let out = job.copy(&job.source_url(
        "localhost",
        "?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
    ));
    out.assert_exit_code(2);
    assert!(out.stderr.contains("/nonexistent/ca.pem"), "{}", out.stderr);
}

/// The data path has its own protocol client: MD5 password authentication (pre-SCRAM servers'
/// default) must work there too, with and without TLS.
#[test]
fn md5_password_authentication() {
    let job = setup("md5_auth");
    for params in ["?sslmode=disable", "?sslmode=require"] {
        let source = format!(
            "postgres://{MD5_ROLE}:{PASSWORD_ROLE_PASSWORD}@127.0.0.1:{}/{}{params}",
            pg().port,
            job.source_db
        );
        let out = job.copy(&source);
        out.assert_success();
        assert!(!out.all_output().contains(PASSWORD_ROLE_PASSWORD));
        assert_same_data(
            &job.source_url("127.0.0.1", "?sslmode=require"),
            &job.target,
        );
    }
}
