//! Configuration loading: the example file, defaults, error messages (key path,
//! line and column), and that passwords never leak.

use std::time::Duration;

use pgfleet::{
    Config, ConfigError, ConsistencyConfig, DefaultRead, Fallback, FleetConfig, HttpConfig,
    PrimaryConfig, ReplicaConfig, RestartConfig, SameSite, ServerUrl, Strategy,
};
use proptest::prelude::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");

/// A `[primary]` table that is valid on its own.
const PRIMARY: &str = "[primary]\nurl = \"postgres://app@10.0.0.1:5432/app\"\n";

fn err_of(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(config) => panic!("expected an error, got {config:?} from:\n{text}"),
        Err(e) => e,
    }
}

#[test]
fn example_file_parses_to_the_documented_defaults() -> anyhow::Result<()> {
    let config = Config::from_path(EXAMPLE)?;

    // The example sets every key to its default.
    assert_eq!(config.fleet, FleetConfig::default());
    assert_eq!(config.consistency, ConsistencyConfig::default());
    assert_eq!(config.http, HttpConfig::default());
    assert_eq!(config.http.cookie_name, "pgfleet_token");
    assert_eq!(config.http.cookie_max_age, Duration::from_secs(600));
    assert_eq!(config.http.cookie_same_site, SameSite::Lax);
    assert_eq!(config.http.header_name, "x-pgfleet-token");
    assert!(config.http.keys.is_empty());

    assert_eq!(config.fleet.lease_timeout, Duration::from_secs(2));
    assert_eq!(config.fleet.probe_interval, Duration::from_millis(250));
    assert_eq!(config.fleet.failure_threshold, 3);
    assert_eq!(config.fleet.strategy, Strategy::LeastOutstanding);
    assert_eq!(config.fleet.restart.max_backoff, Duration::from_secs(10));
    assert_eq!(config.fleet.slow_start, Duration::ZERO);
    assert_eq!(config.consistency.max_lag_bytes, 16_777_216);
    assert_eq!(config.consistency.ryw_wait, Duration::from_millis(100));
    assert_eq!(config.consistency.fallback, Fallback::Primary);

    assert_eq!(config.primary.name, "primary");
    assert_eq!(config.primary.url.host(), "10.0.0.1");
    assert_eq!(config.primary.pool_size, 16);
    assert_eq!(config.primary.read_weight, 0);
    assert_eq!(config.primary.replica_weight, 1);

    let names: Vec<&str> = config.replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["replica1", "replica2"]);
    let replica = &config.replicas[0];
    assert_eq!(replica.url.redacted(), "postgres://app@10.0.0.2:5432/app");
    assert_eq!((replica.url.port(), replica.url.user()), (5432, "app"));
    assert_eq!(replica.url.dbname(), Some("app"));
    assert_eq!((replica.pool_size, replica.weight), (16, 1));
    Ok(())
}

/// Every key a `Config` serializes to appears as `key =` in the example file,
/// so a new field cannot be added without documenting it there.
#[test]
fn example_file_lists_every_key() -> anyhow::Result<()> {
    let example = std::fs::read_to_string(EXAMPLE)?;
    let mut config = Config::new(PrimaryConfig::new(ServerUrl::parse("postgres://a@h/d")?));
    config.replicas.push(ReplicaConfig::new(
        "r1",
        ServerUrl::parse("postgres://a@h2/d")?,
    ));
    let value = toml::Table::try_from(&config)?;

    fn walk(table: &toml::Table, prefix: &str, keys: &mut Vec<String>) {
        for (key, value) in table {
            let path = format!("{prefix}{key}");
            match value {
                toml::Value::Table(t) => walk(t, &format!("{path}."), keys),
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(t) = item {
                            walk(t, &format!("{path}[]."), keys);
                        }
                    }
                }
                _ => keys.push(path),
            }
        }
    }
    let mut keys = Vec::new();
    walk(&value, "", &mut keys);
    assert!(keys.len() > 25, "{keys:?}");
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap_or(&key);
        assert!(
            example
                .lines()
                .any(|l| l.starts_with(&format!("{leaf} = "))),
            "config.example.toml does not set `{key}`"
        );
    }
    Ok(())
}

#[test]
fn minimal_config_fills_every_default() -> anyhow::Result<()> {
    let config = Config::from_toml_str(PRIMARY)?;
    let url = ServerUrl::parse("postgres://app@10.0.0.1:5432/app")?;
    assert_eq!(config, Config::new(PrimaryConfig::new(url)));

    let f = &config.fleet;
    assert_eq!(f.lease_timeout, Duration::from_secs(2));
    assert_eq!(f.probe_interval, Duration::from_millis(250));
    assert_eq!(f.probe_timeout, Duration::from_secs(1));
    assert_eq!(f.connect_timeout, Duration::from_secs(2));
    assert_eq!(f.tcp_keepalive, Duration::from_secs(10));
    assert_eq!(f.tcp_user_timeout, Duration::from_secs(10));
    assert_eq!(f.failure_threshold, 3);
    assert_eq!(f.down_after, Duration::from_secs(5));
    assert_eq!(f.strategy, Strategy::LeastOutstanding);
    assert_eq!(f.restart, RestartConfig::default());
    assert_eq!(f.restart.min_backoff, Duration::from_millis(100));
    assert_eq!(f.restart.max_backoff, Duration::from_secs(10));
    assert_eq!(f.restart.stable_after, Duration::from_secs(30));
    assert_eq!(f.slow_start, Duration::ZERO);
    assert_eq!(f.max_waiters, 1024);
    assert_eq!(f.shutdown_timeout, Duration::from_secs(5));
    assert_eq!(f.start_wait, Duration::ZERO);

    let c = &config.consistency;
    assert_eq!(c.default_read, DefaultRead::Eventual);
    assert_eq!(c.max_lag_bytes, 16 * 1024 * 1024);
    assert_eq!(c.max_lag, Duration::from_secs(5));
    assert_eq!(c.ryw_wait, Duration::from_millis(100));
    assert_eq!(c.fallback, Fallback::Primary);

    assert_eq!(config.primary.name, "primary");
    assert_eq!(config.primary.pool_size, 16);
    assert_eq!(config.primary.read_weight, 0);
    assert_eq!(config.primary.replica_weight, 1);
    assert!(config.replicas.is_empty());
    Ok(())
}

#[test]
fn replica_defaults_and_partial_tables() -> anyhow::Result<()> {
    let text = format!(
        "[fleet]\nstrategy = \"round_robin\"\nrestart = {{ max_backoff = \"1m\" }}\n\
         [consistency]\ndefault_read = \"strong\"\nfallback = \"error\"\n\
         {PRIMARY}[[replicas]]\nname = \"r-1\"\nurl = \"postgresql://app@10.0.0.2/app\"\n"
    );
    let config = Config::from_toml_str(&text)?;
    assert_eq!(config.fleet.strategy, Strategy::RoundRobin);
    assert_eq!(config.fleet.restart.max_backoff, Duration::from_secs(60));
    assert_eq!(config.fleet.restart.min_backoff, Duration::from_millis(100));
    assert_eq!(config.fleet.lease_timeout, Duration::from_secs(2));
    assert_eq!(config.consistency.default_read, DefaultRead::Strong);
    assert_eq!(config.consistency.fallback, Fallback::Error);
    assert_eq!(config.replicas.len(), 1);
    assert_eq!(
        (config.replicas[0].pool_size, config.replicas[0].weight),
        (16, 1)
    );
    Ok(())
}

#[test]
fn serialized_config_parses_back_to_itself() -> anyhow::Result<()> {
    let config = Config::from_path(EXAMPLE)?;
    let text = toml::to_string(&config)?;
    assert_eq!(Config::from_toml_str(&text)?, config);
    Ok(())
}

#[test]
fn missing_file_names_the_path() {
    let path = "/nonexistent/pgfleet-config-test.toml";
    let err = match Config::from_path(path) {
        Ok(config) => panic!("read {config:?}"),
        Err(e) => e,
    };
    assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("reading config file") && msg.contains(path),
        "{msg}"
    );
}

#[test]
fn bad_configs_name_the_key() {
    let replica = |name: &str, extra: &str| {
        format!("[[replicas]]\nname = \"{name}\"\nurl = \"postgres://app@10.0.0.2/app\"\n{extra}")
    };
    let two_replicas =
        |extra1: &str| format!("{PRIMARY}{}{}", replica("r0", ""), replica("r1", extra1));

    // (TOML, substrings the error message must contain)
    let cases: Vec<(String, Vec<&str>)> = vec![
        // Unknown keys: top level, nested, deeper, in an array of tables.
        (format!("foo = 1\n{PRIMARY}"), vec!["foo: unknown field `foo`", "line 1, column 1"]),
        (
            format!("[fleet]\nprobe_intervall = \"1s\"\n{PRIMARY}"),
            vec!["fleet.probe_intervall: unknown field", "line 2, column 1"],
        ),
        (
            format!("[fleet.restart]\nmax = \"1s\"\n{PRIMARY}"),
            vec!["fleet.restart.max: unknown field", "line 2"],
        ),
        (two_replicas("wieght = 2\n"), vec!["replicas[1].wieght: unknown field", "line 9"]),
        (format!("{PRIMARY}passwrd = \"x\"\n"), vec!["primary.passwrd", "line 3"]),
        // Values of the wrong form or type.
        (
            format!("[fleet]\nlease_timeout = \"5 parsecs\"\n{PRIMARY}"),
            vec!["fleet.lease_timeout", "5 parsecs", "line 2, column 17"],
        ),
        (two_replicas("weight = -1\n"), vec!["replicas[1].weight", "-1", "line 9, column 10"]),
        (two_replicas("weight = \"2\"\n"), vec!["replicas[1].weight", "invalid type", "line 9, column 10"]),
        (
            format!("[fleet]\nstrategy = \"fastest\"\n{PRIMARY}"),
            vec!["fleet.strategy", "unknown variant `fastest`", "line 2"],
        ),
        (
            format!("[consistency]\ndefault_read = \"Strong\"\n{PRIMARY}"),
            vec!["consistency.default_read", "line 2"],
        ),
        (format!("fleet = 3\n{PRIMARY}"), vec!["fleet: invalid type: integer `3`, expected a table", "line 1"]),
        (format!("{PRIMARY}[replicas]\n"), vec!["replicas: invalid type: table, expected an array"]),
        // Many clusters.
        (
            format!("{PRIMARY}[clusters.default.primary]\nurl = \"postgres://app@h/app\"\n"),
            vec!["clusters.default", "top-level cluster"],
        ),
        (
            format!("{PRIMARY}[clusters.\"a b\".primary]\nurl = \"postgres://app@h/app\"\n"),
            vec!["clusters.a b", "letters, digits"],
        ),
        (
            format!("{PRIMARY}[clusters.t1.primary]\nurl = \"postgres://app@h/app\"\n[[clusters.t1.replicas]]\nname = \"primary\"\nurl = \"postgres://app@h2/app\"\n"),
            vec!["clusters.t1.replicas[0].name", "already used by clusters.t1.primary.name"],
        ),
        (
            format!("{PRIMARY}[clusters.t1]\nreplicas = []\n"),
            vec!["clusters.t1.primary: required key is missing"],
        ),
        (
            format!("{PRIMARY}[clusters.t1.primary]\nurl = \"mysql://h/app\"\n"),
            vec!["clusters.t1.primary.url"],
        ),
        (
            format!("[fleet]\nunknown_cluster = \"fallback\"\n{PRIMARY}"),
            vec!["fleet.unknown_cluster", "line 2"],
        ),
        // TOML syntax.
        (
            format!("{PRIMARY}pool_size = = 3\n"),
            vec!["invalid TOML", "line 3, column 13"],
        ),
        ("[primary\nurl = 1\n".to_owned(), vec!["invalid TOML", "line 1"]),
        // Missing required keys.
        ("[fleet]\nfailure_threshold = 3\n".to_owned(), vec!["primary: required key is missing"]),
        ("[primary]\nname = \"pg1\"\n".to_owned(), vec!["primary.url: required key is missing", "line 1"]),
        (
            format!("{PRIMARY}[[replicas]]\nname = \"r0\"\n"),
            vec!["replicas[0].url: required key is missing", "line 3"],
        ),
        (
            format!("{PRIMARY}[[replicas]]\nurl = \"postgres://app@h/app\"\n"),
            vec!["replicas[0].name: required key is missing"],
        ),
        // Bad URLs.
        (
            "[primary]\nurl = \"mysql://app@10.0.0.1/app\"\n".to_owned(),
            vec!["primary.url", "unsupported URL scheme `mysql`", "line 2, column 7"],
        ),
        (
            format!("{PRIMARY}[[replicas]]\nname = \"r0\"\nurl = \"postgres://app@h1:5432,h2:5432/app\"\n"),
            vec!["replicas[0].url", "2 hosts", "line 5"],
        ),
        ("[primary]\nurl = \"postgres://10.0.0.1/app\"\n".to_owned(), vec!["primary.url", "no user"]),
        (
            "[primary]\nurl = \"postgres://app@h/app?sslmode=always\"\n".to_owned(),
            vec!["primary.url", "invalid value for option `sslmode`"],
        ),
        (
            format!(
                "{PRIMARY}[[replicas]]\nname = \"r0\"\n\
                 url = \"postgres://app:${{PGFLEET_TEST_SURELY_UNSET_VAR}}@h/app\"\n"
            ),
            vec!["replicas[0].url", "`PGFLEET_TEST_SURELY_UNSET_VAR`", "not set"],
        ),
        // Validation: ranges.
        (format!("{PRIMARY}pool_size = 0\n"), vec!["primary.pool_size: is 0"]),
        (two_replicas("pool_size = 10001\n"), vec!["replicas[1].pool_size"]),
        (two_replicas("weight = 10001\n"), vec!["replicas[1].weight"]),
        (
            format!("{PRIMARY}replica_weight = 10001\n"),
            vec!["primary.replica_weight"],
        ),
        (
            format!("[fleet]\nprobe_interval = \"0s\"\n{PRIMARY}"),
            vec!["fleet.probe_interval: must be more than 0s"],
        ),
        (
            format!("[fleet]\nlease_timeout = \"2days\"\n{PRIMARY}"),
            vec!["fleet.lease_timeout", "maximum"],
        ),
        (
            format!("[fleet.restart]\nstable_after = \"0s\"\n{PRIMARY}"),
            vec!["fleet.restart.stable_after"],
        ),
        (
            format!("[consistency]\nmax_lag = \"0ms\"\n{PRIMARY}"),
            vec!["consistency.max_lag"],
        ),
        (
            format!("[fleet]\ntcp_keepalive = \"500ms\"\n{PRIMARY}"),
            vec!["fleet.tcp_keepalive", "at least 1s"],
        ),
        (
            format!("[fleet]\nfailure_threshold = 0\n{PRIMARY}"),
            vec!["fleet.failure_threshold: must be at least 1"],
        ),
        (
            format!("[fleet]\nmax_waiters = 0\n{PRIMARY}"),
            vec!["fleet.max_waiters: must be at least 1"],
        ),
        // Validation: orderings between keys.
        (
            format!("[fleet.restart]\nmin_backoff = \"20s\"\nmax_backoff = \"10s\"\n{PRIMARY}"),
            vec!["fleet.restart.min_backoff", "fleet.restart.max_backoff (10s)"],
        ),
        (
            format!("[consistency]\nryw_wait = \"3s\"\n{PRIMARY}"),
            vec!["consistency.ryw_wait", "fleet.lease_timeout (2s)"],
        ),
        (
            format!("[fleet]\nprobe_timeout = \"6s\"\n{PRIMARY}"),
            vec!["fleet.probe_timeout", "fleet.down_after (5s)"],
        ),
        // Validation: names and weights.
        (
            format!("{PRIMARY}{}{}", replica("pg2", ""), replica("pg2", "")),
            vec!["replicas[1].name", "`pg2` is already used by replicas[0].name"],
        ),
        (
            format!("{PRIMARY}name = \"pg1\"\n{}", replica("pg1", "")),
            vec!["replicas[0].name", "already used by primary.name"],
        ),
        (format!("{PRIMARY}{}", replica("pg 2", "")), vec!["replicas[0].name", "' '"]),
        (format!("{PRIMARY}name = \"\"\n"), vec!["primary.name: must not be empty"]),
        (
            format!("{PRIMARY}name = \"{}\"\n", "a".repeat(64)),
            vec!["primary.name", "at most 63"],
        ),
        (
            format!("{PRIMARY}{}{}", replica("r0", "weight = 0\n"), replica("r1", "weight = 0\n")),
            vec!["replicas[*].weight", "weight 0"],
        ),
        // [http]: unknown keys, forms, ranges, keys (whose values are never shown).
        (format!("[http]\ncookie = \"t\"\n{PRIMARY}"), vec!["http.cookie: unknown field", "line 2"]),
        (
            format!("[http]\ncookie_same_site = \"sometimes\"\n{PRIMARY}"),
            vec!["http.cookie_same_site", "unknown variant `sometimes`", "line 2"],
        ),
        (
            format!("[http]\ncookie_same_site = \"None\"\ncookie_secure = false\n{PRIMARY}"),
            vec!["http.cookie_same_site", "requires http.cookie_secure = true"],
        ),
        (
            format!("[http]\ncookie_max_age = \"500ms\"\n{PRIMARY}"),
            vec!["http.cookie_max_age", "at least 1s"],
        ),
        (
            format!("[http]\ncookie_max_age = \"2days\"\n{PRIMARY}"),
            vec!["http.cookie_max_age", "maximum"],
        ),
        (format!("[http]\ncookie_name = \"a b\"\n{PRIMARY}"), vec!["http.cookie_name", "' '"]),
        (format!("[http]\ncookie_name = \"\"\n{PRIMARY}"), vec!["http.cookie_name: must not be empty"]),
        (format!("[http]\ncookie_path = \"app\"\n{PRIMARY}"), vec!["http.cookie_path", "start with `/`"]),
        (format!("[http]\nheader_name = \"x token\"\n{PRIMARY}"), vec!["http.header_name", "' '"]),
        (format!("[http]\nheader_name = \"Cookie\"\n{PRIMARY}"), vec!["http.header_name", "reserved"]),
        (
            format!("[http]\nkeys = [\"{}\", \"short-key\"]\n{PRIMARY}", "k".repeat(32)),
            vec!["http.keys[1]", "is 9 bytes long", "at least 32 bytes"],
        ),
        (
            format!("[http]\nkeys = \"a-key-given-as-a-string\"\n{PRIMARY}"),
            vec!["http.keys", "expected an array", "line 2"],
        ),
        (
            format!("[http]\nkeys = [\"${{PGFLEET_TEST_SURELY_UNSET_KEY}}\"]\n{PRIMARY}"),
            vec!["http.keys[0]", "`PGFLEET_TEST_SURELY_UNSET_KEY`", "not set"],
        ),
        (
            format!("[http]\nkeys = [\"${{PGFLEET-HTTP-KEY-0123456789-0123456789}}\"]\n{PRIMARY}"),
            vec!["http.keys[0]", "not a valid environment variable name", "line 2"],
        ),
        (
            format!("[http]\ncookie_name = \"__Host-t\"\ncookie_path = \"/app\"\n{PRIMARY}"),
            vec!["http.cookie_path", "`__Host-...`"],
        ),
        // An unencoded `@` (the message never shows the URL).
        (
            "[primary]\nname = \"p\"\nurl = \"postgres://h/app?user=app&password=Secret99@x\"\n".to_owned(),
            vec!["primary.url", "`%40`"],
        ),
        // A host no TLS certificate can name, with sslmode=prefer (the default).
        (
            "[primary]\nname = \"p\"\nurl = \"postgres://app@db-/app\"\n".to_owned(),
            vec!["primary.url", "`db-` is not a host name"],
        ),
    ];
    assert!(cases.len() >= 20);

    let mut failures = Vec::new();
    for (text, wants) in &cases {
        let msg = err_of(text).to_string();
        for want in wants.iter().filter(|want| !msg.contains(*want)) {
            failures.push(format!(
                "error for\n{text}\nis `{msg}`, which lacks `{want}`"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for (text, _) in cases.iter().filter(|(t, _)| t.contains("Secret99")) {
        let err = err_of(text);
        assert!(!format!("{err} {err:?}").contains("Secret99"), "{err:?}");
    }
}

#[test]
fn error_variants_carry_key_and_position() {
    match err_of(&format!("[fleet]\nstrategy = \"fastest\"\n{PRIMARY}")) {
        ConfigError::Syntax {
            line,
            column,
            key,
            message,
        } => {
            assert_eq!((line, column), (2, 12));
            assert_eq!(key.as_deref(), Some("fleet.strategy"));
            assert!(message.contains("fastest"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let err = err_of(&format!("[fleet]\nfailure_threshold = 0\n{PRIMARY}"));
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    assert_eq!(err.key(), Some("fleet.failure_threshold"));
}

const SECRET: &str = "Sup3rS3cretPw";

/// Error text, `Debug` included, that must not contain `secret`.
fn assert_no_secret(what: &str, text: &str, secret: &str) {
    assert!(!text.contains(secret), "{what} leaks the password: {text}");
}

#[test]
fn passwords_never_shown() -> anyhow::Result<()> {
    let text = format!(
        "[primary]\nurl = \"postgres://app:{SECRET}@10.0.0.1:5432/app\"\n\
         [[replicas]]\nname = \"r1\"\nurl = \"postgres://app@10.0.0.2/app?password={SECRET}&sslmode=disable\"\n\
         [[replicas]]\nname = \"r2\"\nurl = \"host=10.0.0.3 user=app password='{SECRET}' dbname=app\"\n"
    );
    let config = Config::from_toml_str(&text)?;
    // The real password is there for connecting...
    for url in [
        &config.primary.url,
        &config.replicas[0].url,
        &config.replicas[1].url,
    ] {
        assert_eq!(url.pg_config().get_password(), Some(SECRET.as_bytes()));
    }
    // ...and nowhere else.
    assert_no_secret("Debug", &format!("{config:?}"), SECRET);
    assert_no_secret("pretty Debug", &format!("{config:#?}"), SECRET);
    assert_no_secret("serialized", &toml::to_string(&config)?, SECRET);
    assert_eq!(
        config.primary.url.to_string(),
        "postgres://app:***@10.0.0.1:5432/app"
    );
    assert_eq!(
        format!("{:?}", config.primary.url),
        "ServerUrl(\"postgres://app:***@10.0.0.1:5432/app\")"
    );
    assert_eq!(
        config.replicas[0].url.redacted(),
        "postgres://app@10.0.0.2/app?password=***&sslmode=disable"
    );
    assert_eq!(
        config.replicas[1].url.redacted(),
        "host=10.0.0.3 user=app password='***' dbname=app"
    );

    // Bad configs that contain the password: none of their errors show it.
    let url = format!("postgres://app:{SECRET}@10.0.0.1:5432/app");
    let bad = [
        format!("[primary]\nurl = \"{url}\"\nbogus = 1\n"),
        format!("[primary]\nurl = \"{url}\"\npool_size = 0\n"),
        format!("[primary]\nurl = \"postgres://app:{SECRET}@h1,h2/app\"\n"),
        format!("[primary]\nurl = \"mysql://app:{SECRET}@h/app\"\n"),
        format!("[primary]\nurl = \"postgres://app:{SECRET}@h/app?sslmode=bogus\"\n"),
        format!("[primary]\nurl = \"postgres://app@h/app?{SECRET}=1\"\n"),
        format!("[primary]\nurl = \"postgres://app@h/app?password={SECRET}&x\"\n"),
        format!("[primary]\nurl = \"host=h password={SECRET} bogus\"\n"),
        format!("[primary]\nurl = \"postgres://:{SECRET}@h/app\"\n"),
        format!("[primary]\nurl = \"{url}\"\nread_weight = \"{url}\"\n"),
        format!("[fleet]\nlease_timeout = \"{url}\"\n[primary]\nurl = \"{url}\"\n"),
        format!("[fleet]\nstrategy = \"host=h password={SECRET}\"\n[primary]\nurl = \"{url}\"\n"),
        format!("[primary]\nurl = \"{url}\n"),
        format!("[primary]\nurl = \"{url}\" x\n"),
        format!("[primary]\nurl = '{url}'\n[primary]\n"),
        format!("[primary]\nurl = [\"{url}\"]\n"),
    ];
    for text in &bad {
        let err = err_of(text);
        assert_no_secret(&format!("error for\n{text}\n"), &err.to_string(), SECRET);
        assert_no_secret(&format!("error for\n{text}\n"), &format!("{err:?}"), SECRET);
    }
    for raw in [
        format!("postgres://app:{SECRET}@h1,h2/app"),
        format!("postgres://app:{SECRET}@h/app?sslmode=bogus"),
        format!("postgres://:{SECRET}@h/app"),
        format!("http://app:{SECRET}@h/app"),
    ] {
        match ServerUrl::parse(&raw) {
            Ok(url) => panic!("parsed {url:?}"),
            Err(err) => assert_no_secret(&raw, &format!("{err} {err:?}"), SECRET),
        }
    }
    Ok(())
}

#[test]
fn password_from_environment() -> anyhow::Result<()> {
    const VAR: &str = "PGFLEET_TEST_CONFIG_PASSWORD";
    const VALUE: &str = "Env-S3cret!@:/";
    // Safe in edition 2021; the name is unique to this test.
    std::env::set_var(VAR, VALUE);

    let text = format!("[primary]\nurl = \"postgres://app:${{{VAR}}}@10.0.0.1/app\"\n");
    let config = Config::from_toml_str(&text)?;
    let url = &config.primary.url;
    assert_eq!(url.pg_config().get_password(), Some(VALUE.as_bytes()));
    assert_eq!(url.redacted(), "postgres://app:***@10.0.0.1/app");
    assert_no_secret("Debug", &format!("{config:?}"), VALUE);

    let url = ServerUrl::parse(&format!("host=h user=app password=${{{VAR}}}"))?;
    assert_eq!(url.pg_config().get_password(), Some(VALUE.as_bytes()));

    // An unset variable: the error names the key and the variable.
    let unset = "PGFLEET_TEST_CONFIG_UNSET_PASSWORD";
    let text = format!(
        "[primary]\nurl = \"postgres://app@10.0.0.1/app\"\n\
         [[replicas]]\nname = \"r0\"\nurl = \"postgres://app:${{{unset}}}@10.0.0.2/app\"\n"
    );
    match err_of(&text) {
        ConfigError::MissingEnv { key, var } => {
            assert_eq!((key.as_str(), var.as_str()), ("replicas[0].url", unset));
        }
        other => panic!("{other:?}"),
    }
    match ServerUrl::parse(&format!("postgres://app:${{{unset}}}@h/app")) {
        Err(ConfigError::MissingEnv { key, var }) => {
            assert_eq!((key.as_str(), var.as_str()), ("url", unset));
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn code_built_configs_validate() -> anyhow::Result<()> {
    let url = ServerUrl::parse("postgres://app@10.0.0.1/app")?;
    let mut config = Config::new(PrimaryConfig::new(url.clone()));
    config.replicas.push(ReplicaConfig::new("r0", url.clone()));
    config.replicas.push(ReplicaConfig::new("r1", url));
    config.validate()?;

    config.replicas[1].name = "r0".to_owned();
    let err = config.validate().err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.starts_with("replicas[1].name:")),
        "{err:?}"
    );

    config.replicas[1].name = "r1".to_owned();
    config.consistency.ryw_wait = Duration::from_secs(3);
    assert_eq!(
        config
            .validate()
            .err()
            .and_then(|e| e.key().map(str::to_owned))
            .as_deref(),
        Some("consistency.ryw_wait")
    );
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in ".*") {
        let _ = Config::from_toml_str(&text);
        let _ = ServerUrl::parse(&text);
    }

    /// TOML-shaped input reaches deeper than uniformly random text.
    #[test]
    fn toml_shaped_text_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("[primary]\n"), Just("[fleet]\n"), Just("[fleet.restart]\n"),
                Just("[consistency]\n"), Just("[[replicas]]\n"), Just("url = "),
                Just("name = "), Just("weight = "), Just("pool_size = "),
                Just("probe_interval = "), Just("strategy = "), Just("\"postgres://a:b@h/d\""),
                Just("\"5s\""), Just("\"0s\""), Just("-1"), Just("3"), Just("\n"), Just("="),
                Just("\""), Just("'"), Just("é"), Just("{ min_backoff = \"1s\" }"),
                Just("\"host=h user=u password=${X}\""), Just("\"postgres://u@%2Ftmp/d\""),
            ],
            0..24,
        )
    ) {
        let text: String = parts.concat();
        let _ = Config::from_toml_str(&text);
    }

    #[test]
    fn url_shaped_text_never_panics(
        scheme in prop_oneof![Just("postgres://"), Just("postgresql://"), Just("")],
        rest in "[a-z:@/?=&%,\\[\\]$\\{\\}'\\\\ 0-9.]{0,40}",
    ) {
        let _ = ServerUrl::parse(&format!("{scheme}{rest}"));
    }

    /// Whatever the password, a valid URL shows it nowhere but `pg_config()`.
    #[test]
    fn generated_passwords_never_shown(
        password in "[A-Za-z0-9]{12,24}",
        host in "[a-z]{1,8}",
        query in any::<bool>(),
    ) {
        let password = format!("Pw{password}");
        let raw = if query {
            format!("postgres://app@{host}:5432/app?password={password}")
        } else {
            format!("postgres://app:{password}@{host}:5432/app")
        };
        let url = ServerUrl::parse(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(url.pg_config().get_password(), Some(password.as_bytes()));
        let config = Config::new(PrimaryConfig::new(url.clone()));
        for shown in [url.to_string(), format!("{url:?}"), format!("{config:?}")] {
            prop_assert!(!shown.contains(&password), "{}", shown);
        }

        let bad = format!("[primary]\nurl = \"{raw}\"\nbogus = 1\n");
        let err = Config::from_toml_str(&bad).err().map(|e| format!("{e} {e:?}"));
        prop_assert!(err.as_ref().is_some_and(|e| !e.contains(&password)), "{:?}", err);
    }
}
