//! Where the CLI's words go: answers on stdout, notes on stderr. A reader that goes away
//! (`rollwave deploy ... --plan -o json | head -3`) ends the command quietly, never in a panic
//! (`println!` panics on a closed pipe, since Rust ignores SIGPIPE).

use std::io::{self, Write as _};

/// Exit code when stdout's reader went away: 128 + SIGPIPE, what the shell reports for a program
/// SIGPIPE ended (as `cat` or `grep` would be), so a pipeline with `pipefail` still sees the cut.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// Stdout's reader went away: nothing more can be shown. `main` exits quietly with
/// [`EXIT_STDOUT_CLOSED`].
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Writes `text` to stdout as it is.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(error) => Err(anyhow::Error::new(error).context("write to stdout")),
    }
}

/// Writes `text` to stderr as it is. Notes and progress are a courtesy: a closed stderr loses
/// them and changes nothing else.
pub fn write_stderr(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
}

/// Help is laid out for at least this many columns, and no line of an after-help text (examples
/// above all) is wider, so clap never breaks an example command in the middle; a narrower terminal
/// folds lines itself, which copying undoes.
pub const HELP_MIN_WIDTH: usize = 80;

/// The width clap lays help out for: the terminal's (else `COLUMNS`, else 100, as clap would),
/// at least [`HELP_MIN_WIDTH`].
pub fn help_width() -> usize {
    terminal_size::terminal_size()
        .map(|(width, _)| usize::from(width.0))
        .or_else(|| std::env::var("COLUMNS").ok()?.parse().ok())
        .unwrap_or(100)
        .max(HELP_MIN_WIDTH)
}

/// Whether `error` is, at its root, stdout's reader going away.
pub fn is_stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<StdoutClosed>())
}

/// `println!` that returns `Err(StdoutClosed)` instead of panicking when the reader went away.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::console::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns `Err(StdoutClosed)` instead of panicking when the reader went away.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::console::write_stdout(&format!($($arg)*))
    };
}

/// `eprintln!` that loses the line, rather than panicking, when stderr is closed.
macro_rules! noteln {
    ($($arg:tt)*) => {
        $crate::cli::console::write_stderr(&format!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {noteln, out, outln};

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Lines of `command`'s and its subcommands' hand-laid texts wider than the help layout.
    fn wide_lines(command: &clap::Command, path: &str, wide: &mut Vec<String>) {
        let texts = [
            command.get_long_about(),
            command.get_after_help(),
            command.get_after_long_help(),
        ];
        for text in texts.into_iter().flatten() {
            for line in text.to_string().lines() {
                if line.chars().count() > HELP_MIN_WIDTH {
                    wide.push(format!("{path}: {line}"));
                }
            }
        }
        for subcommand in command.get_subcommands() {
            wide_lines(subcommand, &format!("{path} {}", subcommand.get_name()), wide);
        }
    }

    #[test]
    fn help_examples_are_never_wrapped_mid_command() {
        let mut wide = Vec::new();
        wide_lines(&crate::cli::Cli::command(), "rollwave", &mut wide);
        assert!(
            wide.is_empty(),
            "clap would break these lines (wider than {HELP_MIN_WIDTH} columns) in a narrow terminal:\n{}",
            wide.join("\n")
        );
        let mut command = crate::cli::Cli::command().term_width(HELP_MIN_WIDTH);
        let help = command
            .find_subcommand_mut("release")
            .and_then(|release| release.find_subcommand_mut("push"))
            .expect("release push")
            .render_long_help()
            .to_string();
        assert!(
            help.contains("\n  rollwave release push site-1.4.2.zip --bundle site --version 1.4.2 \\\n      --bucket"),
            "{help}"
        );
    }
}
