//! Aligned text tables for the commands that print one (`audit timeline`, `status`).

use std::fmt::Write as _;

/// A header and rows, each column as wide as its widest cell, two spaces apart. Columns with
/// `right` set are right-aligned (numbers), the others left-aligned (text); a left-aligned last
/// column is not padded, so no line ends in spaces.
pub fn render<const N: usize>(header: [&str; N], right: [bool; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let columns = row.iter().zip(widths).zip(right);
        for (column, ((cell, width), right)) in columns.enumerate() {
            // Writing to a String cannot fail.
            let _ = match (column + 1 == N, right) {
                (true, true) => write!(table, "{cell:>width$}"),
                (true, false) => write!(table, "{cell}"),
                (false, true) => write!(table, "{cell:>width$}  "),
                (false, false) => write!(table, "{cell:<width$}  "),
            };
        }
        table.push('\n');
    }
    table
}
