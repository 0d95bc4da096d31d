//! Colour for people at a terminal: whether to use it (`--color`, then the
//! `NO_COLOR` and `CLICOLOR_FORCE` conventions, then whether the output is a
//! terminal) and the one palette every terminal line uses.

use anstyle::{AnsiColor, Style};

use crate::dispatch::ShardStatus;

/// `--color`: `auto` follows the environment and the terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when writing to a terminal, unless `NO_COLOR` is set (or
    /// `CLICOLOR=0`); `CLICOLOR_FORCE` turns it on anywhere.
    #[default]
    Auto,
    /// Always colour, even into a file or a pipe.
    Always,
    /// Never colour.
    Never,
}

impl ColorChoice {
    /// Whether output going to a terminal (`is_terminal`) or not gets colour,
    /// by the conventions of no-color.org and bixense.com/clicolors, in the
    /// order cargo and clap apply them: NO_COLOR wins over CLICOLOR_FORCE.
    pub fn enabled(self, is_terminal: bool) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                if anstyle_query::no_color() {
                    false
                } else if anstyle_query::clicolor_force() {
                    true
                } else if anstyle_query::clicolor() == Some(false) {
                    false
                } else {
                    is_terminal && anstyle_query::term_supports_color()
                }
            }
        }
    }
}

/// The styles of a run's terminal output; all plain when colour is off.
#[derive(Debug, Clone, Copy, Default)]
pub struct Palette {
    enabled: bool,
}

impl Palette {
    /// A palette that colours when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Palette { enabled }
    }

    /// `text` in the colour of `status`: green passed, red failed, yellow
    /// timed out, bold magenta for a shard that could not run, cyan
    /// for one interrupted.
    pub fn status(&self, status: &ShardStatus, text: &str) -> String {
        let color = match status {
            ShardStatus::Passed => AnsiColor::Green,
            ShardStatus::Failed { .. } => AnsiColor::Red,
            ShardStatus::TimedOut => AnsiColor::Yellow,
            ShardStatus::InfraFailed { .. } => AnsiColor::Magenta,
            ShardStatus::Interrupted { .. } => AnsiColor::Cyan,
        };
        let style = Style::new().fg_color(Some(color.into()));
        let style = if *status == ShardStatus::Passed {
            style
        } else {
            style.bold()
        };
        self.paint(style, text)
    }

    /// `text` dimmed: prefixes and details that frame the output.
    pub fn dim(&self, text: &str) -> String {
        self.paint(Style::new().dimmed(), text)
    }

    /// `text` in bold: headings.
    pub fn bold(&self, text: &str) -> String {
        self.paint(Style::new().bold(), text)
    }

    fn paint(&self, style: Style, text: &str) -> String {
        if self.enabled {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_palette_paints_only_when_enabled() {
        let failed = ShardStatus::Failed {
            exit_code: Some(1),
            signal: None,
        };
        assert_eq!(Palette::new(false).status(&failed, "FAILED"), "FAILED");
        assert_eq!(
            Palette::new(true).status(&failed, "FAILED"),
            "\u{1b}[1m\u{1b}[31mFAILED\u{1b}[0m"
        );
        assert!(ColorChoice::Always.enabled(false));
        assert!(!ColorChoice::Never.enabled(true));
    }
}
