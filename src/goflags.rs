//! The Go driver's command line, as upstream's operator starts the image:
//! flags only, no subcommand, in Go's `flag` syntax (`-name`, `--name`,
//! `-name=value`, `-name value`; booleans only as `-name` or `-name=bool`),
//! plus klog's logging flags. This turns such a command line into `serve`
//! arguments, a log verbosity, and notes on what was ignored.

/// Why the command line cannot be read. Go's `flag` package refuses the same.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid boolean value {value:?} for -{flag}")]
    NotABool { flag: String, value: String },
    #[error("invalid value {value:?} for -{flag}: not a number")]
    NotANumber { flag: String, value: String },
    #[error("bad flag syntax: {0}")]
    Syntax(String),
}

/// What a flag is, and where its value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A `serve` flag that takes a value (same name).
    Value,
    /// A `serve` switch (same name).
    Switch,
    /// klog's `-v`: mapped to the log level.
    Verbosity,
    /// A klog flag with a value that has no meaning here.
    IgnoredValue,
    /// A klog switch that has no meaning here.
    IgnoredSwitch,
}

fn kind(name: &str) -> Option<Kind> {
    Some(match name {
        // The Go driver's own flags (cmd/plugin), then this driver's.
        "endpoint"
        | "drivername"
        | "datadir"
        | "nodeid"
        | "version"
        | "metrics-cert-file"
        | "metrics-key-file"
        | "metrics-tls-version"
        | "config"
        | "metrics-addr" => Kind::Value,
        "node-only-expansion" => Kind::Switch,
        "v" => Kind::Verbosity,
        // klog v2's flags: logs go to stderr here whatever they say.
        "vmodule"
        | "log_dir"
        | "log_file"
        | "log_file_max_size"
        | "stderrthreshold"
        | "alsologtostderrthreshold"
        | "log_backtrace_at" => Kind::IgnoredValue,
        "logtostderr"
        | "alsologtostderr"
        | "legacy_stderr_threshold_behavior"
        | "add_dir_header"
        | "skip_headers"
        | "one_output"
        | "skip_log_headers" => Kind::IgnoredSwitch,
        _ => return None,
    })
}

/// The translated command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GoArgs {
    /// `serve` arguments, each `--name=value` or `--name`.
    pub serve: Vec<String>,
    /// klog's `-v`, when given.
    pub verbosity: Option<u32>,
    /// One line per flag or argument that was accepted but has no effect.
    pub notes: Vec<String>,
}

/// Go's `strconv.ParseBool`.
fn parse_bool(flag: &str, value: &str) -> Result<bool, ArgsError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(ArgsError::NotABool {
            flag: flag.into(),
            value: value.into(),
        }),
    }
}

/// Go's endpoint parsing puts a `/` before what follows `unix://`, so
/// `unix://tmp/csi.sock` is `/tmp/csi.sock`; this driver wants it absolute.
fn go_endpoint(value: &str) -> String {
    match value.strip_prefix("unix://") {
        Some(rest) if !rest.starts_with('/') => format!("unix:///{rest}"),
        _ => value.to_owned(),
    }
}

/// Splits one argument into a flag name and an inline value.
fn split_flag(arg: &str) -> Result<(&str, Option<&str>), ArgsError> {
    let body = arg
        .strip_prefix("--")
        .or_else(|| arg.strip_prefix('-'))
        .unwrap_or(arg);
    if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
        return Err(ArgsError::Syntax(arg.into()));
    }
    Ok(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

impl GoArgs {
    fn take_value(
        name: &str,
        inline: Option<&str>,
        rest: &mut std::slice::Iter<'_, String>,
    ) -> Result<String, ArgsError> {
        match inline {
            Some(v) => Ok(v.to_owned()),
            None => rest
                .next()
                .cloned()
                .ok_or_else(|| ArgsError::MissingValue(name.into())),
        }
    }

    fn value_flag(&mut self, name: &str, value: String) {
        let value = match name {
            "endpoint" => go_endpoint(&value),
            "version" if value.is_empty() => {
                self.notes
                    .push("-version is empty; reporting this build's version".into());
                return;
            }
            _ => value,
        };
        // Go's flag package keeps the last of a repeated flag.
        let prefix = format!("--{name}=");
        self.serve.retain(|a| !a.starts_with(&prefix));
        self.serve.push(format!("{prefix}{value}"));
    }

    /// A flag this driver does not know: Go would refuse it, but a newer
    /// operator may pass flags a newer Go driver knows, so it is skipped.
    fn unknown(
        &mut self,
        name: &str,
        inline: Option<&str>,
        rest: &mut std::slice::Iter<'_, String>,
    ) {
        let value = match inline {
            Some(v) => Some(v.to_owned()),
            None if rest.as_slice().first().is_some_and(|n| !n.starts_with('-')) => {
                rest.next().cloned()
            }
            None => None,
        };
        self.notes
            .push(format!("unknown flag -{name} (value {value:?}) ignored"));
    }

    fn flag(
        &mut self,
        arg: &str,
        rest: &mut std::slice::Iter<'_, String>,
    ) -> Result<(), ArgsError> {
        let (name, inline) = split_flag(arg)?;
        match kind(name) {
            Some(Kind::Value) => {
                let value = Self::take_value(name, inline, rest)?;
                self.value_flag(name, value);
            }
            Some(Kind::Switch) => {
                if parse_bool(name, inline.unwrap_or("true"))? {
                    self.serve.push(format!("--{name}"));
                }
            }
            Some(Kind::Verbosity) => {
                let value = Self::take_value(name, inline, rest)?;
                let level = value.parse().map_err(|_| ArgsError::NotANumber {
                    flag: name.into(),
                    value: value.clone(),
                })?;
                self.verbosity = Some(level);
            }
            Some(Kind::IgnoredValue) => {
                let value = Self::take_value(name, inline, rest)?;
                self.notes.push(format!(
                    "klog flag -{name}={value} ignored (logs go to stderr)"
                ));
            }
            Some(Kind::IgnoredSwitch) => {
                let value = parse_bool(name, inline.unwrap_or("true"))?;
                self.notes.push(format!(
                    "klog flag -{name}={value} ignored (logs go to stderr)"
                ));
            }
            None => self.unknown(name, inline, rest),
        }
        Ok(())
    }

    /// Translates the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<GoArgs, ArgsError> {
        let mut out = GoArgs::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            if arg == "--" {
                break;
            }
            if !arg.starts_with('-') || arg == "-" {
                // Go stops at the first non-flag argument; the driver ignores the rest.
                out.notes
                    .push(format!("argument {arg:?} and those after it ignored"));
                return Ok(out);
            }
            out.flag(arg, &mut rest)?;
        }
        let left: Vec<&String> = rest.collect();
        if !left.is_empty() {
            out.notes
                .push(format!("arguments after -- ignored: {left:?}"));
        }
        Ok(out)
    }

    /// The tracing filter for klog's `-v`: up to 3 (the operator's default)
    /// is info, 4 is debug and 5 or more is trace, for this driver's events.
    pub fn log_filter(&self) -> Option<&'static str> {
        Some(match self.verbosity? {
            0..=3 => "info",
            4 => "info,hostpath_csi=debug",
            _ => "info,hostpath_csi=trace",
        })
    }
}

/// Whether `args` (after the program name) are the Go driver's command line
/// rather than a subcommand: they start with a flag, and are not a lone
/// `--help`/`--version` asking about this program.
pub fn is_go_command_line(args: &[String]) -> bool {
    match args {
        [] => false,
        [only] if matches!(only.as_str(), "-h" | "--help" | "-V" | "--version") => false,
        [first, ..] => first.starts_with('-'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_go_syntax_is_read() {
        let got = GoArgs::parse(&args(&[
            "-drivername",
            "d",
            "--nodeid=n",
            "-v=5",
            "--logtostderr",
            "-alsologtostderr=false",
            "--stderrthreshold",
            "INFO",
            "-log_dir=/tmp",
            "--endpoint=unix://tmp/csi.sock",
            "-node-only-expansion",
        ]))
        .unwrap();
        assert_eq!(
            got.serve,
            [
                "--drivername=d",
                "--nodeid=n",
                "--endpoint=unix:///tmp/csi.sock",
                "--node-only-expansion"
            ]
        );
        assert_eq!(got.verbosity, Some(5));
        assert_eq!(got.notes.len(), 4, "{:?}", got.notes);
        assert_eq!(got.log_filter(), Some("info,hostpath_csi=trace"));
    }

    #[test]
    fn values_may_start_with_a_dash_and_hold_equals() {
        let got =
            GoArgs::parse(&args(&["-datadir", "[{\"a\":\"b=c\"}]", "-version", "-x"])).unwrap();
        assert_eq!(got.serve, ["--datadir=[{\"a\":\"b=c\"}]", "--version=-x"]);
    }

    #[test]
    fn a_repeated_flag_keeps_its_last_value_as_go_does() {
        let got = GoArgs::parse(&args(&[
            "--datadir=a",
            "--nodeid=n",
            "--datadir=b",
            "-metrics-tls-version=VersionTLS12",
            "--metrics-tls-version=VersionTLS13",
        ]))
        .unwrap();
        let datadirs: Vec<_> = got
            .serve
            .iter()
            .filter(|a| a.starts_with("--datadir="))
            .collect();
        assert_eq!(datadirs, ["--datadir=b"]);
        let tls: Vec<_> = got
            .serve
            .iter()
            .filter(|a| a.starts_with("--metrics-tls-version="))
            .collect();
        assert_eq!(tls, ["--metrics-tls-version=VersionTLS13"]);
    }

    #[test]
    fn what_go_refuses_is_refused() {
        assert_eq!(
            GoArgs::parse(&args(&["--nodeid"])),
            Err(ArgsError::MissingValue("nodeid".into()))
        );
        assert!(matches!(
            GoArgs::parse(&args(&["-logtostderr=maybe"])),
            Err(ArgsError::NotABool { .. })
        ));
        assert!(matches!(
            GoArgs::parse(&args(&["-v=loud"])),
            Err(ArgsError::NotANumber { .. })
        ));
        assert!(matches!(
            GoArgs::parse(&args(&["---x"])),
            Err(ArgsError::Syntax(_))
        ));
        assert!(matches!(
            GoArgs::parse(&args(&["-=x"])),
            Err(ArgsError::Syntax(_))
        ));
    }

    #[test]
    fn unknown_flags_and_positionals_are_noted_not_fatal() {
        let got = GoArgs::parse(&args(&["--future", "x", "-nodeid=n", "pos", "-v=9"])).unwrap();
        assert_eq!(got.serve, ["--nodeid=n"]);
        assert_eq!(got.verbosity, None);
        assert_eq!(got.notes.len(), 2, "{:?}", got.notes);
        let got = GoArgs::parse(&args(&["-nodeid=n", "--", "-v=9"])).unwrap();
        assert_eq!(got.verbosity, None);
        assert_eq!(got.notes.len(), 1);
        let got = GoArgs::parse(&args(&["-version="])).unwrap();
        assert!(got.serve.is_empty());
    }

    #[test]
    fn the_mode_is_told_by_the_first_argument() {
        assert!(is_go_command_line(&args(&["--drivername=x"])));
        assert!(is_go_command_line(&args(&["--version=v1", "--nodeid=n"])));
        assert!(is_go_command_line(&args(&["--version", "v1"])));
        assert!(!is_go_command_line(&args(&["--version"])));
        assert!(!is_go_command_line(&args(&["--help"])));
        assert!(!is_go_command_line(&args(&["serve", "--nodeid=n"])));
        assert!(!is_go_command_line(&args(&[])));
    }

    #[test]
    fn verbosity_maps_to_a_filter() {
        let v = |n| GoArgs {
            verbosity: Some(n),
            ..GoArgs::default()
        };
        assert_eq!(v(3).log_filter(), Some("info"));
        assert_eq!(v(4).log_filter(), Some("info,hostpath_csi=debug"));
        assert_eq!(GoArgs::default().log_filter(), None);
    }
}
